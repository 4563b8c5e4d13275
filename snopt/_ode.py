"""Neural ODE blocks on the stock torchdiffeq, with an exact horizon gradient.

The block wraps the user's vector field in :class:`_Field`, which counts function
evaluations and exposes torchdiffeq's own step callbacks (``callback_step`` and
``callback_step_adjoint``).  Those callbacks hand us the exact solver state (and, in
the adjoint solve, the exact adjoint) at every step start, which is how curvature is
sampled along the backward solve without patching the solver.  A sampler may instead
record the solver's own evaluations of the field (:meth:`StateSampler.stages`): the block
then publishes each evaluation as :attr:`ODEBlock.evaluation` while it runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, Union

import torch
from torch import Tensor, nn
from torchdiffeq import odeint, odeint_adjoint

from ._defaults import ADAPTIVE_METHODS, METHODS, ODE

State = Union[Tensor, tuple[Tensor, ...]]  # noqa: UP007 - a runtime alias on Python 3.10


_ADAPTIVE_OPTIONS = frozenset(
    {
        "first_step",
        "min_step",
        "max_step",
        "step_t",
        "jump_t",
        "safety",
        "ifactor",
        "dfactor",
        "max_num_steps",
        "dtype",
        "norm",
    }
)
_FIXED_OPTIONS = frozenset({"step_size", "grid_constructor", "interp", "perturb"})
_ADAMS_OPTIONS = _FIXED_OPTIONS | {"max_iters", "max_order"}

#: Default cap on adaptive steps, so that a stiff field fails loudly instead of hanging.
DEFAULT_MAX_NUM_STEPS = 10_000
#: Default cap on field evaluations per solve (the forward solve, and the backward pass, each).
DEFAULT_MAX_NFE: int = ODE["max_nfe"]

#: ``stop_check(block)``: called by an :class:`ODEBlock` at every field evaluation inside a
#: solve; it may raise to stop the solve there (in the forward solve or the adjoint backward).
StopCheck = Callable[["ODEBlock"], None]

# Messages of torchdiffeq's internal assertions that signal a failed solve.
_SOLVER_FAILURES = ("underflow in dt", "max_num_steps exceeded", "non-finite values in state")


class SolverError(RuntimeError):
    """An ODE solve failed (step-size underflow, too many steps, non-finite state)."""


def as_solver_error(exc: BaseException) -> SolverError | None:
    """Return ``exc`` as a :class:`SolverError` when it is a solver failure, else None."""
    if isinstance(exc, SolverError):
        return exc
    if isinstance(exc, AssertionError) and any(m in str(exc) for m in _SOLVER_FAILURES):
        return SolverError(
            f"ODE solve failed: {str(exc)[:200]}. Try looser rtol/atol, a smaller horizon "
            "t1 (or bounds on it), a fixed-grid method such as 'rk4', or a smaller learning rate."
        )
    return None


@dataclass
class SolverStats:
    """Work done by one :class:`ODEBlock` call (forward solve and, after it, backward).

    Attributes:
        nfe_forward: vector-field evaluations in the forward solve.
        nfe_backward: evaluations in the backward pass (adjoint solve or backprop), plus
            the one that dL/dt1 costs when the block computes it.
        steps_forward: solver steps attempted in the forward solve.
        steps_backward: solver steps attempted in the adjoint solve.
        rejected_forward: rejected adaptive steps in the forward solve.
        rejected_backward: rejected adaptive steps in the adjoint solve.
        samples: curvature samples taken along the backward solve.
        t1: the horizon used.
    """

    nfe_forward: int = 0
    nfe_backward: int = 0
    steps_forward: int = 0
    steps_backward: int = 0
    rejected_forward: int = 0
    rejected_backward: int = 0
    samples: int = 0
    t1: float = 0.0

    def as_dict(self) -> dict[str, float]:
        """The stats as a plain dict."""
        return asdict(self)


class StateSampler(Protocol):
    """What an :class:`ODEBlock` calls to sample (state, adjoint) along the backward solve.

    The curvature collector implements it; the block knows nothing of curvature.
    """

    def sampling(self, block: ODEBlock) -> bool:
        """Whether this forward/backward pass of ``block`` should be sampled."""

    def sample_spacing(self, block: ODEBlock) -> float:
        """Grid spacing, in units of time: at most one sample per grid cell."""

    def sample(self, block: ODEBlock, t: float, state: State, adjoint: State, call: object) -> None:
        """Take one sample: the state and dL/dstate at time ``t``, both detached.

        ``call`` identifies the solve (one forward call of the block and its backward pass)
        the sample belongs to, so that samples can be weighted by the time they represent
        within their own solve: :func:`snopt._curvature.time_weights`.  Each solve is
        sampled at both ends ``t0`` and ``t1`` and at step starts in between.
        """

    def stages(self, block: ODEBlock) -> bool:
        """Whether the sampler records the solver's own field evaluations instead (optional).

        When True, :meth:`sample` is never called: on sampled passes the block publishes
        every evaluation of the field by the solve that carries the gradient (the adjoint
        solve in adjoint mode, the forward solve in direct mode) as
        :attr:`ODEBlock.evaluation` while it runs.  A sampler without this method samples
        step starts.
        """


@dataclass(eq=False)
class FieldEvaluation:
    """One evaluation of a block's field by the solver, on a pass sampled at its stages.

    The block publishes it as :attr:`ODEBlock.evaluation` for the duration of the call, so
    that hooks inside the field know the solve and time they run at; a gradient that
    arrives while it is still published comes from an autograd call inside the field (a
    CNF's trace), not from the backward pass.

    Attributes:
        solve: identifies the solve (one block call and its backward pass); the same
            object for every evaluation of that solve.
        t: the time of the evaluation, a 0-dim tensor (read on the host when the samples
            are weighted, not here).
        step: the solver step the evaluation belongs to: 0 before the first step (the
            initial derivative and the initial step-size probe of adaptive solvers), then
            1, 2, ... counting attempted steps (rejected ones included).
        t0: start of the solve's interval.
        t1: end of the solve's interval.
        adjoint: whether the gradient comes from an adjoint solve (True) or from
            backpropagation through the forward solve (False).
        rejected: the steps of this solve rejected so far (shared with the solve, filled as
            it goes).
        bounds: direct mode: the times of the step starts (and of ``t1`` first) whose
            gradient has arrived during backward, in arrival order (shared with the solve).
            A gradient that arrives after ``k`` of them belongs to the step that ends at the
            ``k``-th (see :mod:`snopt._curvature`).
    """

    solve: object
    t: Tensor
    step: int
    t0: float
    t1: float
    adjoint: bool
    rejected: set[int]
    bounds: list[Tensor]


class _Field(nn.Module):
    """The user's field, plus NFE counting and torchdiffeq step callbacks."""

    func: nn.Module
    _block: ODEBlock

    def __init__(self, func: nn.Module, block: ODEBlock) -> None:
        super().__init__()
        self.func = func
        # A plain attribute, not a submodule, to keep the module tree acyclic.
        object.__setattr__(self, "_block", block)

    def forward(self, t: Tensor, y: Tensor) -> Tensor:
        block = self._block
        run = block._run
        evaluation = None
        if run is not None:
            block._count("nfe_backward" if run.backward_phase else "nfe_forward")
            run.nfe += 1
            if block.max_nfe is not None and run.nfe > block.max_nfe:
                raise SolverError(
                    f"ODE solve stopped: the {'backward' if run.backward_phase else 'forward'} "
                    f"solve took more than max_nfe={block.max_nfe} field evaluations (t0={block.t0}, "
                    f"t1={block.t1:.4g}); the field is likely stiff or diverging. Try a smaller "
                    "learning rate, looser rtol/atol, a smaller horizon t1, or a larger max_nfe."
                )
            if block.stop_check is not None:
                block.stop_check(block)
            if run.stages and run.in_sampled_phase() and torch.is_grad_enabled():
                evaluation = run.evaluation(t)
        block._evaluation = evaluation
        try:
            if block._shapes is None:
                return self.func(t, y)
            return _flatten(self.func(t, _unflatten(y, block._shapes)))
        finally:
            block._evaluation = None

    # torchdiffeq looks these up by name; see torchdiffeq/_impl/misc.py.
    def callback_step(self, t0: Tensor, y0: Tensor, dt: Tensor) -> None:
        self._block._on_step(t0, y0, adjoint_state=None)

    def callback_step_adjoint(self, t0: Tensor, y_aug: tuple[Tensor, ...], dt: Tensor) -> None:
        self._block._on_step(t0, y_aug[1], adjoint_state=y_aug[2])


class _AdaptiveField(_Field):
    """A field for adaptive solvers, which also report rejected steps."""

    def callback_reject_step(self, t0: Tensor, y0: Tensor, dt: Tensor) -> None:
        self._block._count("rejected_forward")
        self._block._on_reject()

    def callback_reject_step_adjoint(self, t0: Tensor, y_aug: Any, dt: Tensor) -> None:
        self._block._count("rejected_backward")
        self._block._on_reject()


@dataclass(eq=False)
class _Run:
    """Book-keeping of one forward call and the backward pass that follows it."""

    sampler: StateSampler | None
    t0: float
    spacing: float
    t1: float = 0.0
    adjoint: bool = True
    #: Whether the sampler records the solver's own evaluations (:meth:`StateSampler.stages`).
    stages: bool = False
    backward_phase: bool = False
    #: Field evaluations of the current solve (reset when the backward pass starts).
    nfe: int = 0
    cells: set[int] = field(default_factory=set)
    #: Stage sampling: attempted steps of the sampled solve, the rejected ones, and (direct
    #: mode) the step-start times whose gradient has arrived (see :class:`FieldEvaluation`).
    step: int = 0
    rejected: set[int] = field(default_factory=set)
    bounds: list[Tensor] = field(default_factory=list)

    def in_sampled_phase(self) -> bool:
        """Whether the solve running now is the one whose evaluations carry the gradient."""
        return self.backward_phase == self.adjoint

    def evaluation(self, t: Tensor) -> FieldEvaluation:
        """The record of an evaluation of the field at time ``t`` in the current step."""
        return FieldEvaluation(
            self, t.detach(), self.step, self.t0, self.t1, self.adjoint, self.rejected, self.bounds
        )

    def new_cell(self, t: float) -> bool:
        """True the first time a time in a given grid cell is seen."""
        cell = math.floor((t - self.t0) / self.spacing + 1e-6)
        if cell in self.cells:
            return False
        self.cells.add(cell)
        return True


def _flatten(state: tuple[Tensor, ...]) -> Tensor:
    return torch.cat([s.reshape(-1) for s in state])


def _unflatten(flat: Tensor, shapes: list[torch.Size]) -> tuple[Tensor, ...]:
    out, start = [], 0
    for shape in shapes:
        n = math.prod(shape)
        out.append(flat[start : start + n].view(shape))
        start += n
    return tuple(out)


def _add_samples(previous: Tensor | None, terms: Tensor) -> Tensor:
    """Per-sample dL/dT terms after one more backward pass.

    Two passes over the same batch (same size) add up, like ``.grad``. A batch of another
    size is other samples: its terms replace the old ones (``t1_grad`` still sums both),
    so a loop that never calls ``zero_t1_grad`` keeps working on a final partial batch.
    """
    if previous is None or previous.shape != terms.shape:
        return terms
    return previous + terms


def _check_time(name: str, value: float) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"`{name}` must be a real number, but got {value!r}.") from None
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be finite, but got {name}={value}.")
    return value


def _check_positive(name: str, value: float) -> float:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"`{name}` must be a positive finite number, but got {name}={value!r}.")
    return float(value)


def check_max_nfe(value: int | None) -> int | None:
    """Validate a per-solve evaluation cap: a positive integer or None."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise ValueError(f"`max_nfe` must be a positive integer or None, but got max_nfe={value!r}.")
    return value


def _solver_options(method: str, options: dict[str, Any] | None) -> dict[str, Any]:
    """A copy of torchdiffeq ``options`` checked against ``method`` (``max_num_steps`` defaulted)."""
    if options is not None and not isinstance(options, Mapping):
        raise TypeError(
            f"`options` must be a mapping of torchdiffeq solver options (e.g. {{'max_num_steps': 1000}}) "
            f"or None, but got options={options!r}."
        )
    options = dict(options or {})
    valid = (
        _ADAPTIVE_OPTIONS
        if method in ADAPTIVE_METHODS
        else (_ADAMS_OPTIONS if "adams" in method else _FIXED_OPTIONS)
    )
    unknown = sorted(set(options) - valid)
    if unknown:
        raise ValueError(
            f"Unknown `options` keys {unknown} for method {method!r}; valid keys are {sorted(valid)}."
        )
    if "step_size" in options:
        _check_positive("options['step_size']", options["step_size"])
    if method in ADAPTIVE_METHODS:
        options.setdefault("max_num_steps", DEFAULT_MAX_NUM_STEPS)
    return options


class ODEBlock(nn.Module):
    """Solve ``dx/dt = func(t, x)`` from ``t0`` to ``t1`` and return ``x(t1)``.

    The horizon ``t1`` is a control variable, not a parameter: it is stored in the
    buffer ``horizon`` (so it is saved in ``state_dict``), read as a float through
    :attr:`t1`, changed with :meth:`set_t1`, and after ``loss.backward()`` its exact
    derivative ``dL/dt1 = dL/dx(t1) . func(t1, x(t1))`` is in :attr:`t1_grad` (and its
    per-sample terms in :attr:`t1_grad_samples`), in adjoint and in direct mode alike.

    Args:
        func: the vector field, an ``nn.Module`` called as ``func(t, x)``.
        t0: start time.
        t1: end time (the horizon); must be greater than ``t0``.
        method: a torchdiffeq method, one of :data:`METHODS`.
        rtol: relative tolerance of adaptive methods (> 0).
        atol: absolute tolerance of adaptive methods (> 0).
        options: torchdiffeq solver options, such as ``{"step_size": 0.1}`` for
            fixed-grid methods. Adaptive methods default to ``max_num_steps=10000``.
        adjoint: solve the backward pass with the adjoint ODE at O(1) memory (True) or
            backpropagate through the solver (False).
        max_nfe: cap on field evaluations per solve, for every method (the forward solve and
            the backward pass count separately); a solve that needs more stops there with a
            :class:`SolverError`.  None: no cap.

    Attributes:
        stop_check: None, or ``stop_check(block)``, called at every field evaluation inside
            a solve (forward and adjoint backward); whatever it raises stops the solve and
            propagates to the caller.  The trainer installs one to enforce budgets mid-solve.
    """

    def __init__(
        self,
        func: nn.Module,
        t0: float = ODE["t0"],
        t1: float = ODE["t1"],
        *,
        method: str = ODE["method"],
        rtol: float = ODE["rtol"],
        atol: float = ODE["atol"],
        options: dict[str, Any] | None = None,
        adjoint: bool = ODE["adjoint"],
        max_nfe: int | None = ODE["max_nfe"],
    ) -> None:
        super().__init__()
        if not isinstance(func, nn.Module):
            raise TypeError(
                f"`func` must be an nn.Module called as func(t, x), but got {type(func).__name__}."
            )
        t0 = _check_time("t0", t0)
        t1 = _check_time("t1", t1)
        if not t1 > t0:
            raise ValueError(f"`t1 > t0` must hold, but got t0={t0}, t1={t1}.")
        if method not in METHODS:
            raise ValueError(
                f"`method` must be one of {list(METHODS)}, but got {method!r}. "
                "('scipy_solver' is not supported: it has no step callbacks and no autograd.)"
            )
        self.rtol = _check_positive("rtol", rtol)
        self.atol = _check_positive("atol", atol)
        options = _solver_options(method, options)
        if not isinstance(adjoint, bool):
            raise TypeError(f"`adjoint` must be a bool, but got {adjoint!r}.")
        self.max_nfe = check_max_nfe(max_nfe)
        self.stop_check: StopCheck | None = None
        self.t0 = t0
        self.method = method
        self.options = options
        self.adjoint = adjoint
        field_cls = _AdaptiveField if method in ADAPTIVE_METHODS else _Field
        self.field: _Field = field_cls(func, self)
        self.horizon: Tensor
        self.register_buffer("horizon", torch.tensor(t1, dtype=torch.float64))
        self.stats = SolverStats(t1=t1)
        #: Counts over every call since the block was built (or :meth:`reset_totals`); unlike
        #: ``stats``, which a forward call starts afresh, they also cover a block called
        #: several times per forward pass (an ODE-RNN calls its block once per observation).
        self.totals = SolverStats(t1=t1)
        #: Whether backward computes dL/dt1 (one extra field evaluation at t1).
        self.horizon_grad = True
        self.t1_grad: Tensor | None = None
        self.t1_grad_samples: Tensor | None = None
        self.sampler: StateSampler | None = None
        self._run: _Run | None = None
        self._shapes: list[torch.Size] | None = None
        self._evaluation: FieldEvaluation | None = None

    @property
    def func(self) -> nn.Module:
        """The user's vector field."""
        return self.field.func

    @property
    def evaluation(self) -> FieldEvaluation | None:
        """The solver's evaluation of the field in progress, on passes sampled at the stages.

        None outside such an evaluation, on other passes, and in the solve that carries no
        gradient (the no-grad forward solve of adjoint mode).
        """
        return self._evaluation

    @property
    def t1(self) -> float:
        """The current horizon as a float."""
        return float(self.horizon)

    def set_t1(self, value: float) -> None:
        """Set the horizon; it must be finite and greater than ``t0``."""
        value = _check_time("t1", value)
        if not value > self.t0:
            raise ValueError(f"`t1 > t0` must hold, but got t0={self.t0}, t1={value}.")
        with torch.no_grad():
            self.horizon.fill_(value)

    def reset_totals(self) -> None:
        """Start the cumulative counts of :attr:`totals` afresh."""
        self.totals = SolverStats(t1=self.t1)

    def _count(self, name: str) -> None:
        setattr(self.stats, name, getattr(self.stats, name) + 1)
        setattr(self.totals, name, getattr(self.totals, name) + 1)

    def zero_t1_grad(self) -> None:
        """Forget the accumulated horizon gradient."""
        self.t1_grad = None
        self.t1_grad_samples = None

    def extra_repr(self) -> str:
        return f"t0={self.t0}, t1={self.t1:.4g}, method={self.method!r}, adjoint={self.adjoint}"

    def forward(self, x: State) -> State:
        y0: Tensor
        if isinstance(x, tuple):
            self._shapes = [s.shape for s in x]
            y0 = _flatten(x)
        else:
            self._shapes = None
            y0 = x
        t1 = self.t1
        self.stats = SolverStats(t1=t1)
        self.totals.t1 = t1
        self._run = run = self._new_run(t1)
        steps, stages = run.sampler is not None and not run.stages, run.stages
        if steps and not y0.requires_grad:
            # Sampling needs the adjoint at t0: a leaf that requires grad gets it (direct mode
            # also samples through tensor hooks on the solver state).
            y0 = y0.detach().requires_grad_()
        if steps and self.adjoint:
            # The adjoint solve's step starts never include t0: sample it from y0's gradient.
            y0.register_hook(self._end_sample_hook(run, self.t0, y0.detach(), self._shapes))
        t = torch.tensor(
            [self.t0, t1], dtype=y0.dtype if y0.is_floating_point() else torch.float32, device=y0.device
        )
        kwargs = dict(rtol=self.rtol, atol=self.atol, method=self.method, options=self.options)
        try:
            if self.adjoint and torch.is_grad_enabled():
                # Buffers that require grad (e.g. a ControlParameter in the field) are
                # inputs of the adjoint solve too, or they would get no gradient.
                tensors = [*self.field.parameters(), *self.field.buffers()]
                params = tuple(p for p in tensors if p.requires_grad)
                ys = odeint_adjoint(self.field, y0, t, adjoint_params=params, **kwargs)
            else:
                ys = odeint(self.field, y0, t, **kwargs)
        except AssertionError as exc:
            err = as_solver_error(exc)
            if err is None:
                raise
            raise err from exc
        finally:
            run.backward_phase = True
            run.nfe = 0
        out = ys[-1]
        if not self.adjoint and out.requires_grad and steps:
            # The forward steps of a direct solve never start at t1: sample it from out's gradient.
            out.register_hook(self._end_sample_hook(run, t1, out.detach(), self._shapes))
        if not self.adjoint and out.requires_grad and stages:
            # The first bound of the backward pass through the steps (see FieldEvaluation.bounds).
            out.register_hook(_BoundHook(run.bounds, t[-1]))
        if self.adjoint and out.requires_grad:
            # A block called several times in one forward (an ODE-RNN) must sample and count
            # (for ``max_nfe``) each adjoint solve with that call's own record and shapes.
            out.register_hook(self._restore_run_hook(run, self._shapes))
        if self.horizon_grad and torch.is_grad_enabled() and not out.requires_grad:
            # A frozen field on an input that needs no grad: dL/dt1 is still wanted whenever
            # the output enters the loss, so it joins the graph through a fresh scalar leaf.
            out = out + torch.zeros((), dtype=out.dtype, device=out.device, requires_grad=True)
        if self.horizon_grad and out.requires_grad:
            out.register_hook(self._horizon_hook(t[-1], out.detach(), self._shapes))
        return _unflatten(out, self._shapes) if self._shapes is not None else out

    def _new_run(self, t1: float) -> _Run:
        """The record of a call: whether and how its sampler samples it (a pass with grad only)."""
        sampler = self.sampler
        if sampler is None or not torch.is_grad_enabled() or not sampler.sampling(self):
            return _Run(None, self.t0, 1.0, t1=t1, adjoint=self.adjoint)
        stages_of = getattr(sampler, "stages", None)
        stages = bool(stages_of(self)) if stages_of is not None else False
        spacing = 1.0 if stages else sampler.sample_spacing(self)
        return _Run(sampler, self.t0, spacing, t1=t1, adjoint=self.adjoint, stages=stages)

    def _end_sample_hook(
        self, run: _Run, t: float, state: Tensor, shapes: list[torch.Size] | None
    ) -> Callable[[Tensor], None]:
        """A tensor hook that samples an end of the solve of ``run`` (time ``t``, ``state``)."""

        def hook(grad: Tensor) -> None:
            if run.sampler is not None:
                self._take_sample(run, t, state, grad, shapes)

        return hook

    def _restore_run_hook(self, run: _Run, shapes: list[torch.Size] | None) -> Callable[[Tensor], None]:
        def hook(grad: Tensor) -> None:
            self._run = run
            self._shapes = shapes

        return hook

    def _horizon_hook(
        self, t1: Tensor, y1: Tensor, shapes: list[torch.Size] | None
    ) -> Callable[[Tensor], None]:
        """dL/dt1 = dL/dx(t1) . f(t1, x(t1)), kept per sample (rows of the batch).

        ``shapes`` are those of the call that made ``y1``: a block called several times in
        one forward pass may see other shapes by the time the hook runs.
        """

        def hook(grad: Tensor) -> None:
            with torch.no_grad():
                f1 = self.field.func(t1, y1 if shapes is None else _unflatten(y1, shapes))
                self._count("nfe_backward")  # the one extra evaluation dL/dt1 costs
                if shapes is None:
                    terms = (
                        (grad * f1).reshape(grad.shape[0], -1).sum(1)
                        if grad.dim() > 0
                        else (grad * f1).reshape(1)
                    )
                else:
                    terms = self._per_sample_dot(_unflatten(grad, shapes), f1)
                terms = terms.to(torch.float64)
                self.t1_grad_samples = _add_samples(self.t1_grad_samples, terms)
                total = terms.sum()
                self.t1_grad = total if self.t1_grad is None else self.t1_grad + total

        return hook

    @staticmethod
    def _per_sample_dot(a: tuple[Tensor, ...], b: tuple[Tensor, ...]) -> Tensor:
        """Row-wise dot of two tuple states whose components share the batch dimension."""
        batch = a[0].shape[0] if a[0].dim() > 0 else 1
        total = torch.zeros(batch, dtype=a[0].dtype, device=a[0].device)
        for ga, fb in zip(a, b):
            prod = (
                (ga * fb).reshape(batch, -1)
                if ga.dim() > 0 and ga.shape[0] == batch
                else (ga * fb).reshape(1, -1)
            )
            total = total + prod.sum(1)
        return total

    def _on_step(self, t0: Tensor, y0: Tensor, adjoint_state: Tensor | None) -> None:
        run = self._run
        if run is None:
            return
        if adjoint_state is None:
            if run.backward_phase:  # a direct-mode solve never calls back in backward
                return
            self._count("steps_forward")
        else:
            self._count("steps_backward")
        sampler = run.sampler
        if sampler is None:
            return
        if run.stages:
            if run.in_sampled_phase():
                run.step += 1
                if not self.adjoint and y0.requires_grad:
                    y0.register_hook(_BoundHook(run.bounds, t0.detach()))
            return
        t = float(t0)  # a host sync, on sampled (refresh) passes only
        shapes = self._shapes
        if adjoint_state is not None:
            if run.new_cell(t):
                self._take_sample(run, t, y0, adjoint_state, shapes)
        elif not self.adjoint and y0.requires_grad and run.new_cell(t):
            state = y0.detach()

            def hook(grad: Tensor) -> None:
                self._take_sample(run, t, state, grad, shapes)

            y0.register_hook(hook)

    def _on_reject(self) -> None:
        run = self._run
        if run is not None and run.stages and run.in_sampled_phase():
            run.rejected.add(run.step)

    def _take_sample(
        self, run: _Run, t: float, y: Tensor, adj: Tensor, shapes: list[torch.Size] | None
    ) -> None:
        sampler = run.sampler
        if sampler is None:
            return
        self._count("samples")
        if shapes is not None:
            sampler.sample(self, t, _unflatten(y.detach(), shapes), _unflatten(adj.detach(), shapes), run)
        else:
            sampler.sample(self, t, y.detach(), adj.detach(), run)


class _BoundHook:
    """A tensor hook on a direct solve's state that notes the time of that state when its
    gradient arrives: the gradients that arrive after it belong to the step that ends there."""

    def __init__(self, bounds: list[Tensor], t: Tensor) -> None:
        self.bounds = bounds
        self.t = t

    def __call__(self, grad: Tensor) -> None:
        self.bounds.append(self.t)


def ode_blocks(model: nn.Module) -> list[tuple[str, ODEBlock]]:
    """All ``ODEBlock`` submodules of ``model`` with their qualified names, in order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, ODEBlock)]
