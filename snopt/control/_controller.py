"""The controller: moves the control variables of a model inside training."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from .. import _defaults as D
from .._defaults import CURVATURES, POLICIES
from .._ode import ODEBlock, ode_blocks
from ._checks import (
    Bounds,
    Schedule,
    check_bounds,
    check_max_step,
    check_momentum,
    check_schedule,
    check_warmup,
    step_size,
)
from ._costs import BaseCost, make_cost
from ._estimators import (
    Estimate,
    GaussNewton,
    Reading,
    RunningMean,
    Target,
    horizon_reader,
    parameter_reader,
)
from ._parameter import ControlParameter
from ._policies import BasePolicy, FixedPolicy, PolicyState, make_policy, project

#: Without bounds a horizon's duration ``t1 - t0`` stays at least this long.
MIN_HORIZON = 1e-3


class _Variable:
    """One control variable: how to read and set it, its cost, bounds, policy and estimates.

    ``origin`` is what the cost and the trust region measure from: a horizon's ``t0`` (they act
    on the duration ``t1 - t0``), 0 for a declared parameter.
    """

    def __init__(
        self,
        name: str,
        get: Callable[[], float],
        set: Callable[[float], None],
        read: Callable[[], Reading | None],
        *,
        cost: BaseCost,
        bounds: Bounds | None,
        policy: BasePolicy,
        target: Target,
        origin: float = 0.0,
    ) -> None:
        self.name = name
        self.get = get
        self.set = set
        self.read = read
        self.cost = cost
        self.bounds = bounds
        self.policy = policy
        self.target = target
        self.origin = origin
        self.horizon = target.param is None
        self.state = policy.init(get())
        self.estimator = RunningMean()
        self.batch: int | None = None
        self.counts = {
            "updates": 0,
            "clipped": 0,
            "limited": 0,
            "skipped": 0,
            "missing": 0,
            "fisher_fallback": 0,
        }
        self.last: dict[str, float] = {}
        self.warned = False


class Controller:
    """Moves the control variables of a model inside training (horizons and declared parameters).

    The controlled variables are the horizon ``t1`` of every :class:`~snopt.ODEBlock` (each its
    own variable, under the key ``t1/<block name>``, or ``t1`` when the model itself is the
    block) and every :class:`~snopt.ControlParameter` in the model.  Call :meth:`step` once per
    training step, after ``loss.backward()`` and the optimizer's step, with a closure that
    recomputes the loss of that batch (:func:`snopt.fit` does this)::

        for x, y in loader:
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            controller.step(lambda: loss_fn(model(x), y))

    Every step it reads ``dL/dphi`` (consuming it: nothing accumulates across steps) and keeps
    running averages; every ``every`` steps it changes each variable by its policy (see
    :mod:`snopt.control` for the math), limits the change to the trust region ``max_step`` and
    projects it onto the bounds.  Only update steps call the closure (the Gauss-Newton
    curvature and the feedback term need it); a gradient or fixed policy, or
    ``curvature="fisher"``, works without it.

    Args:
        model: the model; its ODE blocks and :class:`~snopt.ControlParameter` modules are found.
        policy: ``"fixed"``, ``"gradient"`` (first order, ``-eta Q_phi``), ``"feedback"``
            (SNOpt's second-order policy), or a :class:`~snopt.BasePolicy`.
        lr: the step size ``eta`` (> 0), or a callable of the update index; None for the
            policy's default (:data:`snopt._defaults.POLICY_LR`).
        penalty: weight of the cost on the horizons (>= 0), in the units of the loss.
        cost: ``"quadratic"`` (``penalty / 2 * (t1 - t0)^2``) or ``"linear"`` (``penalty *
            (t1 - t0)``), or a :class:`~snopt.BaseCost`; it acts on each block's duration
            (a :class:`~snopt.ControlParameter` has its own cost, on its value).
        every: steps between control updates (positive integer).
        bounds: ``(low, high)`` for every horizon, a dict from variable name to
            ``(low, high)``, or None.  Horizon bounds must satisfy ``t0 < low < high`` and
            hold the current ``t1``.  Without bounds a horizon's duration stays at least
            :data:`MIN_HORIZON` (counted as clipping too).
        optimizer: the parameter optimizer; the feedback term reads its last update through
            its step hooks (default: the model's parameters, snapshot at the forward pass
            of each update step).
        momentum: weight of older steps in the running averages between updates, in [0, 1]
            (0: the last step only; 1: the plain mean of the window).
        max_step: trust region of one update: a horizon's duration changes at most by the
            factor ``1 + max_step`` either way (1: doubles or halves), a declared parameter
            by at most ``max_step * max(|value|, 1)``; None for no limit.  Changes cut by it
            are counted in :attr:`stats`.
        warmup: steps before the first estimate is kept (integer >= 0); the first update
            comes ``every`` steps after them.
        curvature: ``"gauss_newton"`` (``J^T H J`` through the model output, invariant to
            the scale of the loss; needs the closure) or ``"fisher"`` (the paper's outer
            product of per-sample gradients, free but scaled by the square of the loss).
            Gauss-Newton is right for any loss with curvature in the model output (MSE,
            cross-entropy, Gaussian NLL, a loss of your own), at any scale and noise level;
            where the loss is linear in the output (a CNF's ``-log p``) it uses the Fisher for
            that update (counted as ``fisher_fallback``).  The Fisher is right only for a
            calibrated negative log-likelihood near its optimum, or where the batch cannot be
            recomputed by a closure (random augmentation, a stochastic model); on a low-noise
            MSE it is far too small and the steps overshoot (``benchmarks/horizon_closed_form.py``).
            Cost at ``every=5`` on digits: about 2% of a training step, 4% with the feedback
            term (``benchmarks/horizon_overhead.py``).
        feedback: estimate the feedback term ``Q_phitheta . dtheta`` for the feedback policy
            (one more forward pass on update steps; needs the closure).
        horizons: control the horizons of all blocks (True), of none (False), or of the
            blocks named in a sequence.

    Attributes:
        policy: the :class:`~snopt.BasePolicy`.
        every: steps between updates.
        steps: calls of :meth:`step` so far.

    Example:
        >>> controller = snopt.Controller(model, optimizer=opt)
        >>> result = snopt.fit(model, train, val, task=task, optimizer=opt, controller=controller, epochs=3)
        >>> controller.values
        {'t1/blocks.0': 0.83}
    """

    def __init__(
        self,
        model: nn.Module,
        policy: str | BasePolicy = D.CONTROL["policy"],
        lr: Schedule | None = None,
        penalty: float = D.CONTROL["penalty"],
        cost: str | BaseCost = D.CONTROL["cost"],
        every: int = D.CONTROL["every"],
        bounds: Bounds | Mapping[str, Bounds] | None = None,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        momentum: float = D.CONTROL["momentum"],
        max_step: float | None = D.CONTROL["max_step"],
        warmup: int = D.CONTROL["warmup"],
        curvature: str = D.CONTROL["curvature"],
        feedback: bool = D.CONTROL["feedback"],
        horizons: bool | Sequence[str] = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be an nn.Module, but got {type(model).__name__}.")
        if not isinstance(policy, BasePolicy) and (not isinstance(policy, str) or policy not in POLICIES):
            raise ValueError(
                f"`policy` must be one of {list(POLICIES)} or a BasePolicy, but got policy={policy!r}."
            )
        self.policy = make_policy(policy, None if lr is None else check_schedule("lr", lr))
        self.cost = make_cost(cost, penalty)
        if isinstance(every, bool) or not isinstance(every, int) or every <= 0:
            raise ValueError(f"`every` must be a positive integer, but got every={every!r}.")
        if curvature not in CURVATURES:
            raise ValueError(
                f"`curvature` must be one of {list(CURVATURES)}, but got curvature={curvature!r}."
            )
        if not isinstance(feedback, bool):
            raise ValueError(f"`feedback` must be a bool, but got feedback={feedback!r}.")
        self.every = every
        self.curvature = curvature
        self.feedback = feedback
        self.momentum = check_momentum("momentum", momentum)
        self.max_step = check_max_step("max_step", max_step)
        self.warmup = check_warmup("warmup", warmup)
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"`optimizer` must be a torch.optim.Optimizer or None, but got {type(optimizer).__name__}."
            )
        self.model = model
        self.optimizer = optimizer
        self.steps = 0
        self.curvature_time = 0.0
        self._batch = 1
        self._variables = self._build_variables(model, bounds, horizons)
        self._gauss_newton = GaussNewton(model, [b for _, b in ode_blocks(model)])
        self._previous: list[tuple[Tensor, Tensor]] | None = None
        self._dtheta_norm = math.nan
        self._attach(model, optimizer)

    def _attach(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        """Hook the model's forward (batch size, output) and the optimizer's step (the feedback term)."""
        if optimizer is not None:
            params = [p for group in optimizer.param_groups for p in group["params"]]
        else:
            params = [p for p in model.parameters() if p.requires_grad]
        self._params: list[Tensor] = list({id(p): p for p in params}.values())
        self._hooks = [model.register_forward_pre_hook(self._on_forward)]
        self._hooks.append(model.register_forward_hook(self._on_output))
        if optimizer is not None:
            self._hooks.append(optimizer.register_step_pre_hook(self._on_optimizer_pre))
            self._hooks.append(optimizer.register_step_post_hook(self._on_optimizer_post))

    # ------------------------------------------------------------- set-up
    def _build_variables(
        self, model: nn.Module, bounds: Any, horizons: bool | Sequence[str]
    ) -> dict[str, _Variable]:
        blocks = ode_blocks(model)
        chosen = _chosen_blocks(horizons, [name for name, _ in blocks])
        params = [(name, m) for name, m in model.named_modules() if isinstance(m, ControlParameter)]
        keys = [_t1_key(name) for name, _ in blocks if name in chosen]
        keys += [p.name or name for name, p in params]
        duplicates = sorted({k for k in keys if keys.count(k) > 1})
        if duplicates:
            raise ValueError(
                f"Control variable names must be unique, but {duplicates} appear more than once."
            )
        if not keys:
            raise ValueError(
                "The model has no control variable: no ODEBlock horizon is selected (`horizons`) "
                "and there is no ControlParameter in it."
            )
        per_name = _per_name_bounds(bounds, keys)
        variables: dict[str, _Variable] = {}
        for name, block in blocks:
            if name not in chosen:
                continue
            key = _t1_key(name)
            box = per_name.get(key) if per_name is not None else check_bounds("bounds", bounds)
            block.horizon_grad = True
            variables[key] = _Variable(
                key,
                partial(_get_t1, block),
                block.set_t1,
                horizon_reader(block),
                cost=self.cost,
                bounds=_horizon_bounds(key, block, box),
                policy=self.policy,
                target=Target(key, block),
                origin=block.t0,
            )
        for name, param in params:
            key = param.name or name
            box = per_name[key] if per_name is not None and key in per_name else param.bounds
            value = float(param)
            if box is not None and not box[0] <= value <= box[1]:
                raise ValueError(
                    f"The initial value of {key!r} must lie within its bounds {box}, but got {value}."
                )
            variables[key] = _Variable(
                key,
                partial(float, param),
                param.set,
                parameter_reader(param, self._batch_size),
                cost=param.cost,
                bounds=box,
                policy=self._policy_with_lr(param.lr),
                target=Target(key, _enclosing_block(param, blocks), param),
            )
        return variables

    def _policy_with_lr(self, lr: Schedule | None) -> BasePolicy:
        """The controller's policy, with a declared parameter's own step size where it has one."""
        if lr is None or isinstance(self.policy, FixedPolicy):
            return self.policy
        return self.policy.with_lr(lr)

    def _batch_size(self) -> int:
        return self._batch

    # --------------------------------------------------------------- hooks
    def _next_is_update(self) -> bool:
        step = self.steps + 1
        return step > self.warmup and (step - self.warmup) % self.every == 0

    def _wants_feedback(self) -> bool:
        return self.feedback and any(v.policy.uses_feedback for v in self._variables.values())

    def _snapshot(self) -> None:
        if self._wants_feedback() and self._next_is_update() and not self._gauss_newton.active:
            self._previous = [(p, p.detach().clone()) for p in self._params]

    def _on_forward(self, module: nn.Module, args: Any) -> None:
        if self.optimizer is None and torch.is_grad_enabled():
            self._snapshot()

    def _on_output(self, module: nn.Module, args: Any, out: Any) -> None:
        if self._gauss_newton.active:
            return
        first = out if isinstance(out, Tensor) else next((t for t in _tensors(out)), None)
        if isinstance(first, Tensor) and first.dim() > 0:
            self._batch = int(first.shape[0])

    def _on_optimizer_pre(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._snapshot()

    def _on_optimizer_post(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._previous is not None:
            with torch.no_grad():
                total = sum(float((p.detach() - old).double().pow(2).sum()) for p, old in self._previous)
            self._dtheta_norm = math.sqrt(total)

    def remove_hooks(self) -> None:
        """Remove the hooks this controller put on the model and the optimizer."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    # -------------------------------------------------------------- public
    @property
    def values(self) -> dict[str, float]:
        """Name -> current value of every control variable."""
        return {name: var.get() for name, var in self._variables.items()}

    @property
    def names(self) -> list[str]:
        """The names of the control variables, in order."""
        return list(self._variables)

    @property
    def stats(self) -> dict[str, float]:
        """Counters and the last estimates, as a flat dict.

        ``steps``, ``updates`` and ``curvature_time`` (seconds in the Gauss-Newton passes)
        overall; per variable ``<name>/updates``, ``<name>/clipped`` (projections onto the
        bounds), ``<name>/limited`` (changes cut by the trust region ``max_step``),
        ``<name>/skipped`` (updates without a usable estimate), ``<name>/missing`` (steps whose
        backward gave the variable no gradient), ``<name>/fisher_fallback`` (Gauss-Newton
        updates that used the empirical Fisher because the loss is linear in the model
        output), and, after an update, ``<name>/Q_phi``,
        ``<name>/Q_phiphi``, ``<name>/feedback`` (the term ``Q_phitheta . dtheta``),
        ``<name>/delta`` and ``<name>/lr``.
        """
        updates = max(self.steps - self.warmup, 0) // self.every
        out: dict[str, float] = {
            "steps": float(self.steps),
            "updates": float(updates),
            "curvature_time": self.curvature_time,
        }
        for name, var in self._variables.items():
            for key, count in var.counts.items():
                out[f"{name}/{key}"] = float(count)
            for key, value in var.last.items():
                out[f"{name}/{key}"] = value
        return out

    def step(self, closure: Callable[[], Tensor] | None = None) -> None:
        """Record this training step's estimates; every ``every`` steps, update the variables.

        Call after ``loss.backward()`` and ``optimizer.step()``.

        Args:
            closure: recomputes the training loss of this step's batch (as a scalar tensor,
                by calling the model); called on update steps only, under the hood with the
                model's forward pass in no-grad mode.  Needed on update steps by the
                Gauss-Newton curvature and the feedback term.
        """
        self.steps += 1
        readings = [(var, var.read()) for var in self._variables.values()]
        if self.steps <= self.warmup:
            # The estimates of an untrained network say little about its architecture.
            self._previous = None
            return
        for var, reading in readings:
            if reading is None or not (math.isfinite(reading[0]) and math.isfinite(reading[1])):
                var.counts["missing"] += 1
                continue
            grad, second, var.batch = reading
            var.estimator.add(self.momentum, grad, second)
        if (self.steps - self.warmup) % self.every == 0:
            self._update(self._estimates(closure))
        self._previous = None

    # ------------------------------------------------------------ internals
    def _estimates(self, closure: Callable[[], Tensor] | None) -> dict[str, Estimate]:
        """The Gauss-Newton passes for the variables that need them (none: an empty dict)."""
        gauss_newton = self.curvature == "gauss_newton"
        targets = [
            v.target
            for v in self._variables.values()
            if v.estimator.samples
            and ((gauss_newton and v.policy.uses_curvature) or (self.feedback and v.policy.uses_feedback))
        ]
        if not targets:
            return {}
        if closure is None:
            if not gauss_newton:
                return {}  # the Fisher curvature needs no closure; no feedback term then
            raise ValueError(
                "Controller.step needs `closure` on update steps for curvature='gauss_newton': pass a "
                "callable that recomputes this batch's loss, e.g. "
                "controller.step(lambda: loss_fn(model(x), y)), or build the controller with "
                "curvature='fisher'."
            )
        start = time.perf_counter()
        previous = self._previous if self._wants_feedback() else None
        try:
            return self._gauss_newton.estimate(closure, targets, previous)
        finally:
            self.curvature_time += time.perf_counter() - start

    def _curvature(self, var: _Variable, estimate: Estimate | None) -> float:
        """``Q_phiphi`` of the loss (without the cost's term).

        The Gauss-Newton estimate where the loss has curvature in the model output, else (a
        loss linear in the output, e.g. a CNF's negative log-likelihood) the empirical Fisher,
        counted as ``fisher_fallback``.
        """
        if self.curvature == "gauss_newton" and estimate is not None:
            if estimate.curved:
                return max(estimate.curvature, 0.0)
            var.counts["fisher_fallback"] += 1
        est = var.estimator
        if var.batch is None:
            return est.second
        # m^2 + B v from the batch gradients' running mean m and second moment.
        return est.grad**2 + var.batch * max(est.second - est.grad**2, 0.0)

    def _update(self, estimates: dict[str, Estimate]) -> None:
        for var in self._variables.values():
            est = var.estimator
            if est.samples == 0:
                var.counts["skipped"] += 1
                self._warn_missing(var)
                continue
            estimate = estimates.get(var.name)
            value = var.get()
            duration = value - var.origin
            q_phi = est.grad + var.cost.grad(duration)
            q_phiphi = self._curvature(var, estimate) + var.cost.curvature(duration)
            cross = estimate.feedback if (estimate is not None and var.policy.uses_feedback) else 0.0
            delta = eta = math.nan
            if all(math.isfinite(x) for x in (q_phi, q_phiphi, cross)):
                schedule = getattr(var.policy, "lr", None)
                eta = step_size("lr", schedule, var.state.updates) if schedule is not None else math.nan
                delta, var.state = var.policy.update(
                    q_phi,
                    var.state,
                    curvature=q_phiphi if var.policy.uses_curvature else None,
                    dtheta=cross if var.policy.uses_feedback else None,
                )
                delta = float(delta)
            est.reset()
            if not math.isfinite(delta):
                var.counts["skipped"] += 1
                continue
            if self.max_step is not None:
                limited = _trust_region(duration, delta, self.max_step, var.horizon)
                if limited != delta:
                    delta = limited
                    var.counts["limited"] += 1
            new, clipped = project(value + delta, var.bounds)
            var.counts["clipped"] += int(clipped)
            var.set(new)
            var.counts["updates"] += 1
            var.last = {
                "Q_phi": q_phi,
                "Q_phiphi": q_phiphi,
                "feedback": cross,
                "delta": new - value,
                "lr": eta,
            }
            if estimate is not None:
                var.last["Q_phi_now"] = estimate.grad + var.cost.grad(duration)

    def _warn_missing(self, var: _Variable) -> None:
        if var.warned:
            return
        var.warned = True
        if var.horizon:
            hint = (
                "Its block's output did not reach the loss in backward: check that the loss uses the "
                "block's output and that loss.backward() runs before controller.step()."
            )
        else:
            hint = (
                "Check that the model uses its value in the loss; a ControlParameter in an adjoint-mode "
                "ODEBlock must be read inside the block's vector field."
            )
        warnings.warn(
            f"Control variable {var.name!r} received no gradient in the last {self.every} steps, so it was "
            f"not updated. {hint}",
            RuntimeWarning,
            stacklevel=3,
        )

    # --------------------------------------------------------- state dict
    def state_dict(self) -> dict[str, Any]:
        """The controller's state: step counter, policy states, running estimates, counters."""
        return {
            "steps": self.steps,
            "batch": self._batch,
            "curvature_time": self.curvature_time,
            "variables": {
                name: {
                    "value": var.get(),
                    "batch": var.batch,
                    "policy": dict(var.state._asdict()),
                    "estimator": var.estimator.state_dict(),
                    "counts": dict(var.counts),
                    "last": dict(var.last),
                }
                for name, var in self._variables.items()
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state from :meth:`state_dict` (the variables' values included)."""
        saved = state["variables"]
        missing = sorted(set(self._variables) - set(saved))
        extra = sorted(set(saved) - set(self._variables))
        if missing or extra:
            raise ValueError(
                f"The state does not match this controller's variables {sorted(self._variables)}: "
                f"missing {missing}, unexpected {extra}."
            )
        self.steps = int(state["steps"])
        self._batch = int(state.get("batch", 1))
        self.curvature_time = float(state.get("curvature_time", 0.0))
        for name, var in self._variables.items():
            entry = saved[name]
            var.set(float(entry["value"]))
            var.batch = entry["batch"]
            var.state = PolicyState(**entry["policy"])
            var.estimator.load_state_dict(entry["estimator"])
            var.counts = {**var.counts, **entry["counts"]}  # states saved before a counter existed load
            var.last = dict(entry["last"])

    def __repr__(self) -> str:
        return (
            f"Controller(policy={self.policy!r}, every={self.every}, curvature={self.curvature!r}, "
            f"variables={self.names})"
        )


def _get_t1(block: ODEBlock) -> float:
    return block.t1


def _tensors(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in _tensors(item)]
    if isinstance(out, Mapping):
        return [t for item in out.values() for t in _tensors(item)]
    return []


def _chosen_blocks(horizons: Any, block_names: list[str]) -> set[str]:
    if isinstance(horizons, bool):
        return set(block_names) if horizons else set()
    if isinstance(horizons, Sequence) and not isinstance(horizons, str):
        unknown = sorted(set(horizons) - set(block_names))
        if unknown:
            raise ValueError(f"Unknown `horizons` names {unknown}; the model's ODE blocks are {block_names}.")
        return set(horizons)
    raise ValueError(f"`horizons` must be a bool or a sequence of block names, but got {horizons!r}.")


def _per_name_bounds(bounds: Any, keys: list[str]) -> dict[str, Bounds | None] | None:
    if not isinstance(bounds, Mapping):
        return None
    unknown = sorted(set(bounds) - set(keys))
    if unknown:
        raise ValueError(f"Unknown `bounds` keys {unknown}; valid keys are {sorted(keys)}.")
    return {k: check_bounds(f"bounds[{k!r}]", v) for k, v in bounds.items()}


def _horizon_bounds(key: str, block: ODEBlock, box: Bounds | None) -> Bounds:
    t1 = block.t1
    if box is None:
        return (block.t0 + MIN_HORIZON, math.inf)
    low, high = box
    if not low > block.t0:
        raise ValueError(
            f"The lower bound of {key!r} must be above the block's t0={block.t0}, but got bounds={box}."
        )
    if not low <= t1 <= high:
        raise ValueError(
            f"The initial horizon T0 of {key!r} must lie within the bounds {box}, but got t1={t1}."
        )
    return box


def _trust_region(value: float, delta: float, max_step: float, positive: bool) -> float:
    """Limit ``delta``: a positive variable (a horizon's duration) changes at most by the factor
    ``1 + max_step`` either way; another by at most ``max_step * max(|value|, 1)``."""
    if positive and value > 0:
        up, down = value * max_step, value * max_step / (1.0 + max_step)
    else:
        up = down = max_step * max(abs(value), 1.0)
    return max(-down, min(up, delta))


def _enclosing_block(param: nn.Module, blocks: list[tuple[str, ODEBlock]]) -> ODEBlock | None:
    """The innermost ODE block whose modules include ``param``, if any."""
    found = None
    for _, block in blocks:
        if any(m is param for m in block.modules()):
            found = block
    return found


def _t1_key(name: str) -> str:
    """The history key of a block's horizon (as in the training loop)."""
    return f"t1/{name}" if name else "t1"
