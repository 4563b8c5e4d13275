"""Estimates of ``Q_phi``, ``Q_phiphi`` and ``Q_phitheta . dtheta`` for the control variables.

Two curvature estimators, named in :data:`CURVATURES`:

- ``"gauss_newton"`` (:class:`GaussNewton`): ``Q_phiphi = J^T H J`` with ``J = d output /
  dphi`` over the batch and ``H`` the Hessian of the training loss with respect to the model
  output.  ``J`` is a forward difference of the model output along the variable's tangent:
  for a horizon, the block's output is moved along ``f(T, x(T))`` (what ``dx(T)/dT`` is) and
  pushed through what follows the block; for a declared parameter, the parameter is moved.
  ``H J`` is a Hessian-vector product by double backward through the *loss only* (the
  user's closure, from the model output on), so it holds for any loss and carries the
  loss's own scale: multiplying the loss by ``s`` multiplies ``Q_phi`` and ``Q_phiphi`` by
  ``s`` and leaves the second-order step unchanged.  It equals the exact ``d2L/dphi2`` when
  the output is linear in ``phi`` and drops the term ``dL/doutput . d2output/dphi2``
  otherwise, so it is never negative for a convex loss (cross-entropy, MSE) and does not
  vanish at the optimum.  It needs the loss to have curvature in the model output: for a
  model whose output *is* the log-likelihood (a CNF trained on ``-model(x).mean()``) it is
  zero, and the empirical Fisher is the right choice.
- ``"fisher"``: the paper's outer product ``E_i[(dl_i/dphi)^2]`` from the backward pass:
  free, and right for a calibrated likelihood near its optimum, but it scales with the square
  of the loss (a loss times 100 gives steps 100 times smaller) and vanishes at the optimum of
  a low-noise problem.

The feedback term ``Q_phitheta . dtheta`` is the same Gauss-Newton form along the parameter
update of the last optimizer step: ``(H J)^T (output(theta) - output(theta - dtheta))``, the
change of the model output that the update caused (a forward difference, one forward pass at
the previous parameters).

The passes run the model under ``torch.no_grad`` (the loss alone is differentiated) on a fixed
grid: adaptive blocks are solved by ``rk4`` with as many steps as their last training solve
took, so that a difference of two outputs is not drowned by the step-size control.  A block
called once per forward pass is replayed from the first pass where its input is unchanged,
so that moving one horizon costs only what follows its block.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from .._defaults import ADAPTIVE_METHODS
from .._ode import ODEBlock
from ._parameter import ControlParameter

# (dL/dphi, second moment): the second moment is the per-sample mean of (dl_i/dphi)^2 when
# ``batch`` is None, else the square of the batch gradient.
Reading = tuple[float, float, "int | None"]


class RunningMean:
    """Bias-corrected running averages of ``dL/dphi`` and its second moment since the last update.

    With weights ``w_s = momentum^(n - s)`` over the steps ``s = 1..n`` of the window, restarted
    after every update so that every estimate belongs to the current value of the variable.
    """

    __slots__ = ("weight", "grad", "second", "samples")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Start a new window."""
        self.weight = 0.0
        self.grad = 0.0
        self.second = 0.0
        self.samples = 0

    def add(self, momentum: float, grad: float, second: float) -> None:
        """Add one step's ``dL/dphi`` and second moment."""
        self.weight = momentum * self.weight + 1.0
        alpha = 1.0 / self.weight
        self.samples += 1
        self.grad += alpha * (grad - self.grad)
        self.second += alpha * (second - self.second)

    def state_dict(self) -> dict[str, Any]:
        """The averages as a plain dict."""
        return {"weight": self.weight, "grad": self.grad, "second": self.second, "samples": self.samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.weight = float(state["weight"])
        self.grad = float(state["grad"])
        self.second = float(state["second"])
        self.samples = int(state["samples"])


def horizon_reader(block: ODEBlock) -> Callable[[], Reading | None]:
    """``(dL/dT, mean_i (dl_i/dT)^2, None)`` of the last backward, for a batch-mean loss.

    Reading consumes the gradient (the block's ``t1_grad`` is cleared), so that a plain
    training loop that never calls ``block.zero_t1_grad()`` does not sum it over steps.
    """

    def read() -> Reading | None:
        if block.t1_grad is None:
            return None
        grad = float(block.t1_grad)
        samples = block.t1_grad_samples
        block.zero_t1_grad()
        if samples is None or samples.numel() == 0:
            return grad, grad * grad, None
        # For a mean loss, term_i = (1/B) dl_i/dT, so mean_i (dl_i/dT)^2 = B * sum_i term_i^2.
        return grad, float(samples.numel() * samples.double().pow(2).sum()), None

    return read


def parameter_reader(param: ControlParameter, batch: Callable[[], int]) -> Callable[[], Reading | None]:
    """``(dL/dphi, (dL/dphi)^2, B)``, with ``B`` the batch size of the model's last forward pass."""

    def read() -> Reading | None:
        grad = param.value.grad
        if grad is None:
            return None
        value = float(grad)
        param.value.grad = None
        return value, value * value, batch()

    return read


@dataclass(frozen=True)
class Target:
    """A control variable as the Gauss-Newton passes see it.

    Attributes:
        name: the variable's name.
        block: a horizon's block, or the innermost block that holds a declared parameter.
        param: the declared parameter, or None for a horizon.
    """

    name: str
    block: ODEBlock | None
    param: ControlParameter | None = None


@dataclass(frozen=True)
class Estimate:
    """What the Gauss-Newton passes give one variable (all in the loss's own units).

    Attributes:
        curvature: ``J^T H J``.
        grad: ``dL/dphi = G . J`` at the current parameters (``G = dL/doutput``), on this batch.
        feedback: ``(H J) . (output(theta) - output(theta - dtheta))``; 0 without a previous state.
    """

    curvature: float
    grad: float
    feedback: float


class _Leaves:
    """The model outputs of one pass: detached leaves that the loss is differentiated through."""

    def __init__(self) -> None:
        self.tensors: list[Tensor] = []

    def capture(self, out: Any) -> Any:
        def leaf(t: Any) -> Any:
            if isinstance(t, Tensor) and t.is_floating_point():
                t = t.detach().requires_grad_()
                self.tensors.append(t)
            return t

        return pytree.tree_map(leaf, out)


class GaussNewton:
    """The Gauss-Newton curvature and feedback term of a model's control variables.

    Args:
        model: the model (its root forward is where the output is taken).
        blocks: the model's ODE blocks.
    """

    def __init__(self, model: nn.Module, blocks: Sequence[ODEBlock]) -> None:
        self.model = model
        self.blocks = list(blocks)
        self.active = False

    def estimate(
        self,
        closure: Callable[[], Tensor],
        targets: Sequence[Target],
        previous: Sequence[tuple[Tensor, Tensor]] | None = None,
    ) -> dict[str, Estimate]:
        """Run the passes and return an :class:`Estimate` per target name.

        Args:
            closure: recomputes the training loss of the last batch (a scalar).
            targets: the variables to estimate.
            previous: ``(parameter, its value before the last optimizer step)`` pairs; with
                them the feedback term is estimated (one more forward pass).
        """
        grids = {b: _fixed_grid(b) for b in self.blocks}
        devices = sorted({p.device.index for p in self.model.parameters() if p.device.type == "cuda"})
        with torch.random.fork_rng(devices=devices), _fixed_solvers(grids), warnings.catch_warnings():
            # An adaptive block's field has a rejected-step callback that rk4 never calls.
            warnings.filterwarnings("ignore", message="Solver .* does not support callbacks")
            old: list[Tensor] | None = None
            if previous:
                with _swapped(previous):
                    before, _, _ = self._forward(closure, {}, {})
                old = [o.detach() for o in before]
            outputs, loss, calls = self._forward(closure, {}, {})
            if not outputs:
                raise ValueError(
                    "The `closure` given to Controller.step must call the controller's model, "
                    "but it did not (no model output was seen)."
                )
            grads: Sequence[Tensor | None] = [None] * len(outputs)
            if loss.requires_grad:
                grads = torch.autograd.grad(loss, outputs, create_graph=True, allow_unused=True)
            results = {}
            for target in targets:
                jac = self._jacobian(closure, target, outputs, calls)
                results[target.name] = _contract(outputs, grads, jac, old)
        return results

    def _jacobian(
        self, closure: Callable[[], Tensor], target: Target, base: list[Tensor], calls: _Calls
    ) -> list[Tensor]:
        """``d output / dphi`` by a forward difference along the target's tangent."""
        replay: dict[ODEBlock, Callable[..., Any]] = {}
        perturb: dict[ODEBlock, float] = {}
        start = target.block
        if start is not None and start in calls.order:
            for earlier in calls.order[: calls.order.index(start)]:
                if calls.single(earlier):
                    replay[earlier] = _constant(calls.outputs[earlier][0])
        if target.param is None:
            block = target.block
            if block is None or block not in calls.outputs:
                raise ValueError(f"The `closure` did not call the block of the horizon {target.name!r}.")
            h = _horizon_step(block, calls)
            if calls.single(block):
                out = calls.outputs[block][0]
                replay[block] = _constant(_moved(block, out, h))
            else:
                perturb[block] = h
            outputs, _, _ = self._forward(closure, replay, perturb)
        else:
            value = target.param.value
            saved = value.detach().clone()
            h = _step_size(value.dtype) * max(abs(float(saved)), 1.0)
            try:
                with torch.no_grad():
                    value.add_(h)
                outputs, _, _ = self._forward(closure, replay, perturb)
            finally:
                with torch.no_grad():
                    value.copy_(saved)
        if len(outputs) != len(base) or any(a.shape != b.shape for a, b in zip(outputs, base)):
            raise ValueError(
                "The model's outputs changed shape between two calls of the `closure`; the Gauss-Newton "
                "curvature needs a closure that recomputes the same batch (or use curvature='fisher')."
            )
        return [(a.detach() - b.detach()) / h for a, b in zip(outputs, base)]

    def _forward(
        self,
        closure: Callable[[], Tensor],
        replay: dict[ODEBlock, Callable[..., Any]],
        perturb: dict[ODEBlock, float],
    ) -> tuple[list[Tensor], Tensor, _Calls]:
        """One call of ``closure`` with the model under no_grad; returns outputs, loss, block calls."""
        leaves = _Leaves()
        calls = _Calls()
        modes: list[bool] = []

        def pre(module: nn.Module, args: Any) -> None:
            modes.append(torch.is_grad_enabled())
            torch.set_grad_enabled(False)

        def post(module: nn.Module, args: Any, out: Any) -> Any:
            torch.set_grad_enabled(modes.pop())
            return leaves.capture(out)

        # The blocks' hooks first: where the model is a block, its output is moved before it
        # becomes the leaf that the loss is differentiated through.
        handles = [b.register_forward_hook(calls.hook(b, perturb.get(b))) for b in self.blocks]
        handles += [self.model.register_forward_pre_hook(pre), self.model.register_forward_hook(post)]
        grad_mode = torch.is_grad_enabled()
        self.active = True
        try:
            for block, fn in replay.items():
                object.__setattr__(block, "forward", fn)
            with torch.enable_grad():
                loss = closure()
        finally:
            self.active = False
            torch.set_grad_enabled(grad_mode)
            for block in replay:
                object.__delattr__(block, "forward")
            for handle in handles:
                handle.remove()
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(f"The `closure` must return the loss as a scalar tensor, but returned {loss!r}.")
        return leaves.tensors, loss.reshape(()), calls


class _Calls:
    """The outputs of every block call in one pass, and the order of the first calls."""

    def __init__(self) -> None:
        self.outputs: dict[ODEBlock, list[Any]] = {}
        self.order: list[ODEBlock] = []

    def single(self, block: ODEBlock) -> bool:
        return len(self.outputs.get(block, ())) == 1

    def hook(self, block: ODEBlock, h: float | None) -> Callable[..., Any]:
        def record(module: nn.Module, args: Any, out: Any) -> Any:
            if h is not None:
                out = _moved(block, out, h)
            if block not in self.outputs:
                self.outputs[block] = []
                self.order.append(block)
            self.outputs[block].append(out)
            return out

        return record


def _contract(
    outputs: list[Tensor], grads: Sequence[Tensor | None], jac: list[Tensor], old: list[Tensor] | None
) -> Estimate:
    """``J^T H J``, ``G . J`` and ``(H J) . (output - old output)`` from the loss's graph."""
    pairs = [(o, g, j) for o, g, j in zip(outputs, grads, jac) if g is not None]
    curved = [(o, g, j) for o, g, j in pairs if g.requires_grad]
    hjs: list[Tensor | None] = [None] * len(outputs)
    if curved:
        found = torch.autograd.grad(
            [g for _, g, _ in curved],
            [o for o, _, _ in curved],
            grad_outputs=[j for _, _, j in curved],
            retain_graph=True,
            allow_unused=True,
        )
        index = {id(o): i for i, o in enumerate(outputs)}
        for (o, _, _), hj_found in zip(curved, found):
            hjs[index[id(o)]] = hj_found
    curvature = grad = feedback = 0.0
    for i, (g, j) in enumerate(zip(grads, jac)):
        if g is not None:
            grad += float((g.detach().double() * j.double()).sum())
        hj = hjs[i]
        if hj is None:
            continue
        curvature += float((hj.detach().double() * j.double()).sum())
        if old is not None:
            feedback += float((hj.detach().double() * (outputs[i].detach() - old[i]).double()).sum())
    return Estimate(curvature, grad, feedback)


def _step_size(dtype: torch.dtype) -> float:
    """A forward-difference step relative to the scale of the variable: sqrt of the precision."""
    return math.sqrt(torch.finfo(dtype).eps) if dtype.is_floating_point else 1e-4


def _horizon_step(block: ODEBlock, calls: _Calls) -> float:
    """A step in T that moves the block's output by about sqrt(eps) of its size."""
    out = calls.outputs[block][0]
    x = _flat(out)
    v = _flat(_tangent(block, out))
    scale = float(x.double().norm()) / max(float(v.double().norm()), 1e-300)
    scale = min(max(scale, 1e-6), 1e6) if math.isfinite(scale) and scale > 0 else 1.0
    return _step_size(x.dtype) * scale


def _flat(state: Any) -> Tensor:
    if isinstance(state, Tensor):
        return state.detach().reshape(-1)
    return torch.cat([s.detach().reshape(-1) for s in state])


def _tangent(block: ODEBlock, out: Any) -> Any:
    """``dx(T)/dT = f(T, x(T))`` for a block output (a tensor or a tuple state)."""
    ref = out if isinstance(out, Tensor) else out[0]
    t1 = torch.tensor(block.t1, dtype=ref.dtype, device=ref.device)
    with torch.no_grad():
        return block.func(t1, out)


def _moved(block: ODEBlock, out: Any, h: float) -> Any:
    """The block output moved by ``h`` along its tangent: ``x(T) + h f(T, x(T))``."""
    f = _tangent(block, out)
    if isinstance(out, Tensor):
        return out + h * f
    return tuple(o + h * d for o, d in zip(out, f))


def _constant(value: Any) -> Callable[..., Any]:
    def forward(*args: Any, **kwargs: Any) -> Any:
        return value

    return forward


def _fixed_grid(block: ODEBlock) -> tuple[str, dict[str, Any]]:
    """The block's own solver if it has a fixed grid, else rk4 with its last solve's step count."""
    if block.method not in ADAPTIVE_METHODS:
        return block.method, dict(block.options)
    steps = max(int(block.stats.steps_forward), 2)
    return "rk4", {"step_size": (block.t1 - block.t0) / steps}


@contextmanager
def _fixed_solvers(grids: dict[ODEBlock, tuple[str, dict[str, Any]]]) -> Iterator[None]:
    saved = {b: (b.method, b.options) for b in grids}
    try:
        for block, (method, options) in grids.items():
            block.method, block.options = method, options
        yield
    finally:
        for block, (method, options) in saved.items():
            block.method, block.options = method, options


@contextmanager
def _swapped(previous: Sequence[tuple[Tensor, Tensor]]) -> Iterator[None]:
    """The parameters set to their previous values, restored exactly afterwards."""
    saved = [p.detach().clone() for p, _ in previous]
    try:
        with torch.no_grad():
            for p, old in previous:
                p.copy_(old)
        yield
    finally:
        with torch.no_grad():
            for (p, _), value in zip(previous, saved):
                p.copy_(value)
