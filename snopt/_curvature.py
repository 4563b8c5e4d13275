"""Kronecker-factored curvature of Neural ODE layers, collected along the backward solve.

For every ``nn.Linear`` and ``nn.Conv2d`` layer ``h = W z (+ b)`` of a model, SNOpt
approximates the second-order matrix of the loss with respect to ``[W | b]`` by a
Kronecker product ``A ⊗ B`` of an input factor ``A`` and an output-gradient factor ``B``.

Layers inside the vector field of an :class:`~snopt._ode.ODEBlock` act at every time of
the solve, so their factors are integrals over time.  The :class:`CurvatureCollector` is
installed as the block's :class:`~snopt._ode.StateSampler`: on refresh steps the block
hands it, once per cell of a time grid, the exact state ``x(t)`` and adjoint
``a(t) = dL/dx(t)`` that its backward pass reconstructs (torchdiffeq's own step
callbacks in adjoint mode, tensor hooks on the solver state in direct mode).  The
collector then evaluates the field once, explicitly, on that state with forward hooks on
the field's layers recording each layer's input ``z`` and output ``h``, and takes the
vector-Jacobian product of the adjoint through the field down to every ``h``:
``g = (dh f)^T a``.  The hooks are installed on refresh steps only; there the solver's own
evaluations also run through them (in adjoint mode even the no-grad forward solve does),
but the hooks only count them: they record during the explicit evaluation alone, so
neither the solver nor the inner autograd call of a CNF's trace contributes to the
curvature.

That is ``sampling="steps"``.  With ``sampling="stages"`` the collector evaluates nothing
itself: it records the layers' inputs and output gradients in the solver's own evaluations
of the field on refresh steps, in the solve that carries the gradient.  In adjoint mode that
is the adjoint solve: torchdiffeq evaluates the field with grad enabled inside its augmented
dynamics and pulls ``-a(t)`` back through it, so the forward hook of each layer registers a
tensor hook on its output ``h`` and receives ``g = -(dh f)^T a`` at the stage's time, state
and adjoint (the sign does not matter to ``B``).  The no-grad forward solve records nothing:
the block publishes an evaluation (:attr:`~snopt._ode.ODEBlock.evaluation`) only in the
solve that carries the gradient.  A gradient that arrives while its evaluation is still
running comes from an autograd call inside the field (a CNF's trace) and is ignored.  Each
evaluation is weighted by :func:`time_weights` over the times of the evaluations kept in its
own solve; evaluations of rejected adaptive steps (between ``callback_step`` and
``callback_reject_step``) are dropped, being off the accepted trajectory, and so are those
outside ``[t0, t1]`` (the last adaptive step overshoots the end and is interpolated back).
The initial derivative and the step-size probe of adaptive solvers are kept.

In direct mode (backpropagation through the solver) the forward evaluations are the ones
that receive gradients, but backprop hands each stage ``i`` of a step of length ``dt`` its
gradient times the solver's weight of that stage, ``dt b_i``, which is zero for some stages
(Dormand-Prince's second) and negative for others: a stage's ``g`` alone is not ``g(t)``.
Their sum over a step is, to first order, ``dt`` times ``g`` over the step, so in direct mode
``B`` is built per step from ``G = sum of the stages' g`` as ``B_step = n^2/R sum_r (G_r/dt)
(G_r/dt)^T``, weighted by ``dt``; ``A`` still uses every stage's input, weighted by
:func:`time_weights`.  A stage's gradient is assigned to a step by when it arrives: tensor
hooks on the solver state at each step start (and on the output at ``t1``) note the time of
that state when its gradient is complete.  A stage's gradient arrives after that of the
state its output feeds and before that of the state it is evaluated from, whatever the
solver; so a first-same-as-last stage (evaluated at the end of one step, used as the first
stage of the next) lands in the step whose weight it carries.  Rejected steps get no gradient.
(The first adaptive step's length depends on the initial state through torchdiffeq's step-size
selection, so its stages' gradients also carry that path, as the parameter gradient does.)

Layers outside the ODE blocks (a stem, a head) get the ordinary K-FAC statistics of their
forward and backward pass on refresh steps.

Normalisation (EKFAC's, per call of a layer with ``n`` samples and ``L`` locations, that
is ``R = n L`` rows ``z_r`` (with a trailing 1 when the layer has a bias) and ``g_r``,
and a loss averaged over the batch so that ``n g_r`` is a per-sample gradient)::

    A_call = (1 / R) sum_r z_r z_r^T
    B_call = (1 / R) sum_r (n g_r)(n g_r)^T

Field layers: ``A = H * sum_j w_j A_j / sum_j w_j`` over the samples ``j`` of the step,
and the same for ``B``, with ``H`` the sum of the horizons ``t1 - t0`` of the step's solves:
the time average of the per-time factors times the total time integrated.  A block that is
solved once per forward has ``H = t1 - t0``; one solved ``K`` times per forward (an
ODE-RNN's gaps, a block reused in sequence) sums the ``K`` integrals in its gradient, so its
factors carry all ``K`` horizons (their average understates the curvature by ``K`` per
factor; on the time series SNOpt then diverged at every learning rate of the benchmark).
The weight ``w_j`` of a sample is the time it represents within its own solve
(:func:`time_weights`): the trapezoid rule over the sampled times of that solve, which
include both ends ``t0`` and ``t1`` (the block samples them from the gradients of its
input and output) and the solver's step starts in between (at most one per grid cell of
``sample_step``), so uneven adaptive steps are weighted by their length and each solve's
weights sum to its horizon.  With ``sampling="stages"`` the samples are the kept stage
evaluations of the solve (in direct mode, for ``B``, its steps weighted by their lengths),
normalised the same way, so the factors of both modes estimate the same integrals.
Both factors carry the horizon because
the gradient of a field layer is the time integral ``int_0^T g z^T dt``, whose per-sample
second moment is ``≈ (T mean A_j) ⊗ (T mean B_j)``.
Outer layers: ``A`` and ``B`` are the averages of ``A_call`` and ``B_call`` over the
calls of the step.  A conv layer's factors are per location (``L`` = output pixels); the
optimizer multiplies the second moment by ``L`` when it initialises it.
"""

from __future__ import annotations

import math
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._ode import FieldEvaluation, ODEBlock, State, ode_blocks

#: How field layers are sampled (``CurvatureCollector(sampling=...)``); see the module docstring.
SAMPLINGS = ("steps", "stages")


# --------------------------------------------------------------------- layer adapters
class LayerAdapter(ABC):
    """How one kind of layer turns its inputs, output gradients and parameter gradients into matrices.

    Subclasses handle one module type; :data:`LAYER_ADAPTERS` maps module types to
    adapters and :func:`adapter_for` is the single place where a module is accepted or
    skipped.
    """

    @abstractmethod
    def unsupported(self, module: Any) -> str | None:
        """Why ``module`` cannot be handled (a short reason), or None when it can."""

    @abstractmethod
    def input_rows(self, module: Any, z: Tensor) -> tuple[Tensor, int]:
        """The layer input as rows ``[n * L, in (+1)]`` (a ones column with a bias) and ``L``."""

    @abstractmethod
    def output_rows(self, module: Any, g: Tensor) -> Tensor:
        """A gradient at the layer output as rows ``[n * L, out]``, in the order of :meth:`input_rows`."""

    def grad_matrix(self, module: Any) -> Tensor:
        """The parameter gradient as one matrix ``[out, in (+1)]``: ``[dW | db]``."""
        weight = module.weight
        grad = weight.grad.reshape(weight.shape[0], -1)
        bias = module.bias
        if bias is None:
            return grad
        db = bias.grad if bias.grad is not None else torch.zeros_like(bias)
        return torch.cat([grad, db.reshape(-1, 1)], dim=1)

    def split(self, module: Any, matrix: Tensor) -> tuple[Tensor, Tensor | None]:
        """Inverse of :meth:`grad_matrix`: ``(dW shaped like W, db or None)``."""
        weight = module.weight
        cols = weight[0].numel()
        dw = matrix[:, :cols].reshape(weight.shape)
        db = matrix[:, cols] if module.bias is not None else None
        return dw, db

    @staticmethod
    def _with_ones(module: Any, rows: Tensor) -> Tensor:
        if module.bias is None:
            return rows
        return torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)


class LinearAdapter(LayerAdapter):
    """``nn.Linear``; inputs ``[n, *, in]`` count the middle dimensions as locations."""

    def unsupported(self, module: Any) -> str | None:
        return None

    def input_rows(self, module: Any, z: Tensor) -> tuple[Tensor, int]:
        rows = z.reshape(-1, z.shape[-1])
        n = z.shape[0] if z.dim() >= 2 else 1
        return self._with_ones(module, rows), max(rows.shape[0] // max(n, 1), 1)

    def output_rows(self, module: Any, g: Tensor) -> Tensor:
        return g.reshape(-1, g.shape[-1])


class Conv2dAdapter(LayerAdapter):
    """``nn.Conv2d`` with zero padding and one group; input patches unfolded as in K-FAC for convolutions."""

    def unsupported(self, module: Any) -> str | None:
        if module.groups != 1:
            return f"grouped convolution (groups={module.groups})"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r}"
        if isinstance(module.padding, str) and module.padding != "valid":
            return f"padding={module.padding!r}"
        return None

    def input_rows(self, module: Any, z: Tensor) -> tuple[Tensor, int]:
        if z.dim() == 3:
            z = z.unsqueeze(0)
        padding = 0 if module.padding == "valid" else module.padding
        patches = F.unfold(
            z, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride
        )  # [n, C*kh*kw, L]
        locations = patches.shape[2]
        rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
        return self._with_ones(module, rows), locations

    def output_rows(self, module: Any, g: Tensor) -> Tensor:
        if g.dim() == 3:
            g = g.unsqueeze(0)
        return g.permute(0, 2, 3, 1).reshape(-1, g.shape[1])


#: Module type -> adapter.  Add an entry to support another layer type.
LAYER_ADAPTERS: dict[type[nn.Module], LayerAdapter] = {nn.Linear: LinearAdapter(), nn.Conv2d: Conv2dAdapter()}


def adapter_for(module: nn.Module) -> tuple[LayerAdapter | None, str | None]:
    """The adapter of ``module`` and, when there is none, why it is skipped.

    The one place that decides which modules get curvature: a module whose exact type is
    in :data:`LAYER_ADAPTERS` and that the adapter accepts.  Modules without parameters of
    their own return ``(None, None)``; other modules with parameters (norm layers, RNN
    cells, ...) return ``(None, reason)`` and their parameters get plain SGD-momentum.
    """
    own = [p for p in module.parameters(recurse=False)]
    if not own:
        return None, None
    adapter = LAYER_ADAPTERS.get(type(module))
    if adapter is None:
        return None, f"no curvature adapter for {type(module).__name__}"
    reason = adapter.unsupported(module)
    if reason is not None:
        return None, reason
    if not module.weight.requires_grad:
        return None, "weight does not require grad"
    return adapter, None


# ------------------------------------------------------------------------- layers
@dataclass(eq=False)
class TrackedLayer:
    """One layer whose curvature is collected, with its running sums for the current step.

    Attributes:
        name: qualified name of the module in the model.
        module: the ``nn.Linear`` / ``nn.Conv2d``.
        adapter: its :class:`LayerAdapter`.
        block: the ODE block whose field holds it, or None for a layer outside the blocks.
        calls: forward calls of the module seen by its hook (solver evaluations included).
        sample_calls: calls recorded during the collector's explicit sampling evaluations.
        batch_size: leading dimension of the input at the last call.
    """

    name: str
    module: nn.Module
    adapter: LayerAdapter
    block: ODEBlock | None
    calls: int = 0
    sample_calls: int = 0
    batch_size: int = 1
    a_sum: Tensor | None = None
    b_sum: Tensor | None = None
    weight_sum: float = 0.0
    horizon_sum: float = 0.0
    span: float = 1.0
    locations: int = 1
    count: int = 0
    captures: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    pending: dict[int, _Solve] = field(default_factory=dict)
    stage_pending: dict[int, _StageSolve] = field(default_factory=dict)

    @property
    def weight(self) -> Tensor:
        """The layer's weight parameter."""
        weight: Tensor = self.module.weight  # type: ignore[assignment]
        return weight

    @property
    def bias(self) -> Tensor | None:
        """The layer's bias parameter, if any."""
        bias: Tensor | None = self.module.bias  # type: ignore[assignment]
        return bias

    def _call_factors(self, z: Tensor, g: Tensor) -> tuple[Tensor, Tensor, int]:
        """``(A_call, B_call, L)`` of one call with input ``z`` and output gradient ``g``."""
        z = z.detach()
        g = g.detach()
        n = z.shape[0] if z.dim() >= 2 else 1
        rows_z, locations = self.adapter.input_rows(self.module, z)
        rows_g = self.adapter.output_rows(self.module, g)
        r = rows_z.shape[0]
        a = rows_z.T @ rows_z
        a.div_(r)
        b = rows_g.T @ rows_g
        b.mul_(n * n / r)
        return a, b, locations

    def add_sample(self, solve: Any, t: float, t0: float, t1: float, z: Tensor, g: Tensor) -> None:
        """Keep the factors of a field sample at time ``t`` of ``solve`` (weighted in :meth:`factors`)."""
        a, b, locations = self._call_factors(z, g)
        record = self.pending.get(id(solve))
        if record is None:
            record = self.pending[id(solve)] = _Solve(solve, t0, t1)
        record.times.append(t)
        record.a.append(a)
        record.b.append(b)
        self.locations = locations
        self.span = t1 - t0
        self.count += 1

    def add_stage(self, evaluation: FieldEvaluation, z: Tensor, g: Tensor) -> None:
        """Keep the input ``z`` and output gradient ``g`` of the layer in one solver evaluation
        of its field (weighted in :meth:`factors`)."""
        z = z.detach()
        g = g.detach()
        key = id(evaluation.solve)
        record = self.stage_pending.get(key)
        if record is None:
            record = self.stage_pending[key] = _StageSolve(evaluation)
        rows_z, locations = self.adapter.input_rows(self.module, z)
        rows_g = self.adapter.output_rows(self.module, g)
        r = rows_z.shape[0]
        n = z.shape[0] if z.dim() >= 2 else 1
        record.scale = n * n / r
        a = rows_z.T @ rows_z
        record.a.append(a.div_(r))
        record.times.append(evaluation.t)
        record.steps.append(evaluation.step)
        if evaluation.adjoint:
            b = rows_g.T @ rows_g
            record.b.append(b.mul_(record.scale))
        else:
            # Backprop hands each stage its gradient times the solver's weight of that stage:
            # sum them over the step they belong to (see the module docstring).
            window = len(evaluation.bounds)
            total = record.windows.get(window)
            record.windows[window] = rows_g.clone() if total is None else total.add_(rows_g)
        self.locations = locations
        self.count += 1

    def _settle(self) -> None:
        """Weight the pending field samples by the time they represent and add them to the sums."""
        for record in self.pending.values():
            weights = time_weights(record.times, record.t0, record.t1)
            self.horizon_sum += record.t1 - record.t0
            for w, a, b in zip(weights, record.a, record.b):
                self._add(a.mul_(w), b.mul_(w), w)
        self.pending.clear()
        for stage_record in self.stage_pending.values():
            settled = stage_record.factors()
            if settled is not None:
                horizon = stage_record.evaluation.t1 - stage_record.evaluation.t0
                self.horizon_sum += horizon
                self.span = horizon
                self._add(settled[0], settled[1], horizon)
        self.stage_pending.clear()

    def _add(self, a: Tensor, b: Tensor, weight: float) -> None:
        if self.a_sum is None or self.b_sum is None:
            self.a_sum, self.b_sum = a, b
        else:
            self.a_sum.add_(a)
            self.b_sum.add_(b)
        self.weight_sum += weight

    def accumulate(self, z: Tensor, g: Tensor, weight: float) -> None:
        """Add ``weight * (A_call, B_call)`` of one call with input ``z`` and output gradient ``g``."""
        a, b, locations = self._call_factors(z, g)
        self._add(a.mul_(weight), b.mul_(weight), weight)
        self.locations = locations
        self.count += 1

    def factors(self) -> tuple[Tensor, Tensor, int] | None:
        """``(A, B, L)`` of the statistics gathered since the last reset, or None without any."""
        self._settle()
        if self.a_sum is None or self.b_sum is None or self.weight_sum <= 0:
            return None
        # Field layers: the sum over the step's solves of each solve's horizon times its time
        # average (a block called K times per forward, as in an ODE-RNN, carries K horizons);
        # outer layers: the average over calls (span 1).
        horizon = self.horizon_sum if self.block is not None else self.span
        scale = horizon / self.weight_sum
        return self.a_sum * scale, self.b_sum * scale, self.locations

    def reset(self) -> None:
        """Forget the gathered statistics."""
        self.a_sum = self.b_sum = None
        self.weight_sum = 0.0
        self.horizon_sum = 0.0
        self.count = 0
        self.captures.clear()
        self.pending.clear()
        self.stage_pending.clear()


@dataclass(eq=False)
class _Solve:
    """The field samples of one solve (a block call and its backward pass), before weighting."""

    solve: Any  # kept alive so that its id is not reused while pending
    t0: float
    t1: float
    times: list[float] = field(default_factory=list)
    a: list[Tensor] = field(default_factory=list)
    b: list[Tensor] = field(default_factory=list)


@dataclass(eq=False)
class _StageSolve:
    """The solver evaluations of one solve recorded for one layer, before weighting.

    Attributes:
        evaluation: the first evaluation recorded (the solve, its interval, its rejected
            steps and, in direct mode, its step bounds are shared by all of them).
        times, steps, a: per evaluation: its time, its step and ``A_call``.
        b: adjoint mode: ``B_call`` per evaluation.
        windows: direct mode: per window (the number of step bounds passed when the
            gradient arrived), the sum of the output-gradient rows of its evaluations.
        scale: ``n^2 / R`` of the layer's calls.
    """

    evaluation: FieldEvaluation
    times: list[Tensor] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    a: list[Tensor] = field(default_factory=list)
    b: list[Tensor] = field(default_factory=list)
    windows: dict[int, Tensor] = field(default_factory=dict)
    scale: float = 1.0

    def factors(self) -> tuple[Tensor, Tensor] | None:
        """``(A, B)`` of the solve: its horizon times the time averages, or None without samples.

        Evaluations of rejected steps and outside ``[t0, t1]`` are dropped; the others are
        weighted by :func:`time_weights` over their times.  One host sync reads the times.
        """
        ev = self.evaluation
        t0, t1 = ev.t0, ev.t1
        horizon = t1 - t0
        tol = 1e-9 * max(1.0, abs(t0), abs(t1))
        times = torch.stack(self.times).tolist()
        keep = [
            i
            for i, (t, step) in enumerate(zip(times, self.steps))
            if step not in ev.rejected and t0 - tol <= t <= t1 + tol
        ]
        if not keep:
            return None
        weights = time_weights([min(max(times[i], t0), t1) for i in keep], t0, t1)
        a = torch.zeros_like(self.a[0])
        for w, i in zip(weights, keep):
            a.add_(self.a[i], alpha=w)
        if ev.adjoint:
            b = torch.zeros_like(self.b[0])
            for w, i in zip(weights, keep):
                b.add_(self.b[i], alpha=w)
            return a, b
        # Direct mode: the windows' spans sum to the horizon when every step got gradients.
        spans = self._spans(t0, t1)
        if not spans:
            return None
        width = self.windows[next(iter(spans))].shape[1]
        b = torch.zeros(width, width, dtype=a.dtype, device=a.device)
        for window, span in spans.items():
            rows = self.windows[window]
            b.addmm_(rows.T, rows, alpha=self.scale / span)
        return a, b.mul_(horizon / sum(spans.values()))

    def _spans(self, t0: float, t1: float) -> dict[int, float]:
        """Direct mode: the time span of each window with gradients, within ``[t0, t1]``.

        Window ``w`` holds the gradients that arrived after ``w`` step bounds: the step from
        the ``w + 1``-th bound (``t0`` after the last) to the ``w``-th.
        """
        bounds = self.evaluation.bounds
        ends = torch.stack(bounds).tolist() if bounds else []
        ends.append(t0)
        spans = {}
        for window in self.windows:
            if 1 <= window < len(ends):
                span = min(ends[window - 1], t1) - max(ends[window], t0)
                if span > 0:
                    spans[window] = span
        return spans


def time_weights(times: list[float], t0: float, t1: float) -> list[float]:
    """Quadrature weights of samples at ``times`` for an integral over ``[t0, t1]``.

    The trapezoid rule over the sorted sample times, with the pieces before the first
    and after the last sample given to that sample (constant extension; empty when the
    ends are sampled, as the ODE blocks do).  The weights sum to ``t1 - t0``; they come
    back in the order of ``times``.

    Args:
        times: the sample times, each in ``[t0, t1]``, in any order.
        t0: start of the interval.
        t1: end of the interval.

    Returns:
        One weight per sample.
    """
    if not times:
        return []
    order = sorted(range(len(times)), key=lambda i: times[i])
    ts = [times[i] for i in order]
    weights = [0.0] * len(ts)
    for k in range(len(ts) - 1):
        half = 0.5 * (ts[k + 1] - ts[k])
        weights[k] += half
        weights[k + 1] += half
    weights[0] += ts[0] - t0
    weights[-1] += t1 - ts[-1]
    out = [0.0] * len(ts)
    for rank, i in enumerate(order):
        out[i] = weights[rank]
    return out


class _LayerHook:
    """The forward hook of one tracked layer (a callable object, so the model stays copyable)."""

    def __init__(self, collector: CurvatureCollector, layer: TrackedLayer) -> None:
        self._collector = weakref.ref(collector)
        self._layer = layer

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        layer = self._layer
        collector = self._collector()
        if collector is None or module is not layer.module or not args:
            return
        layer.calls += 1
        z = args[0]
        if not isinstance(z, Tensor):
            return
        layer.batch_size = int(z.shape[0]) if z.dim() >= 2 else 1
        if layer.block is not None:
            if collector._recording:
                layer.sample_calls += 1
                layer.captures.append((z, output))
            elif collector.sampling_mode == "stages" and isinstance(output, Tensor) and output.requires_grad:
                evaluation = layer.block.evaluation
                if evaluation is not None:
                    output.register_hook(_StageHook(collector, layer, evaluation, z.detach()))
        elif (
            collector._armed
            and torch.is_grad_enabled()
            and isinstance(output, Tensor)
            and output.requires_grad
        ):
            output.register_hook(_OuterBackward(collector, layer, z.detach()))

    def __deepcopy__(self, memo: dict[int, Any]) -> _LayerHook:
        # A copied model keeps a hook that ignores it (its modules are not ours).
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return (_InertHook, ())


class _InertHook:
    """What a pickled :class:`_LayerHook` becomes: a hook that does nothing."""

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        return None


class _OuterBackward:
    """Tensor hook on an outer layer's output: the backward half of its K-FAC statistics."""

    def __init__(self, collector: CurvatureCollector, layer: TrackedLayer, z: Tensor) -> None:
        self.collector = collector
        self.layer = layer
        self.z = z

    def __call__(self, grad: Tensor) -> None:
        start = time.perf_counter()
        self.layer.accumulate(self.z, grad, 1.0)
        self.collector.collect_time += time.perf_counter() - start


class _StageHook:
    """Tensor hook on a field layer's output in one solver evaluation: receives its ``g``.

    A gradient that arrives while the evaluation is still in progress comes from an autograd
    call inside the field (a CNF's trace), not from the backward pass: it is ignored.
    """

    def __init__(
        self, collector: CurvatureCollector, layer: TrackedLayer, evaluation: FieldEvaluation, z: Tensor
    ) -> None:
        self.collector = collector
        self.layer = layer
        self.evaluation = evaluation
        self.z = z

    def __call__(self, grad: Tensor) -> None:
        block = self.layer.block
        evaluation = self.evaluation
        if block is None or block.evaluation is evaluation:
            return
        start = time.perf_counter()
        self.layer.add_stage(evaluation, self.z, grad)
        collector = self.collector
        if id(evaluation) not in collector._seen:
            collector._seen[id(evaluation)] = evaluation
            collector.samples += 1
            block._count("samples")
        collector.collect_time += time.perf_counter() - start


# ---------------------------------------------------------------------- collector
class CurvatureCollector:
    """Collects the Kronecker factors of every Linear/Conv2d layer of a model.

    It installs itself as ``block.sampler`` of every :class:`~snopt._ode.ODEBlock` of the
    model and a forward hook on every supported layer.  Collection happens only while it
    is armed (:meth:`arm` with ``refresh=True``, which the optimizer does before a
    refresh step); the forward hooks are installed only while it is armed, so
    other steps run the model without them.  See the module docstring for
    the normalisation of the factors.

    Args:
        model: the model.
        sample_step: ``"steps"`` sampling: grid spacing of the samples along each block's
            backward solve, as a fraction of the horizon ``t1 - t0``, in (0, 1].
        full_precond: also collect the layers outside the ODE blocks.
        params: if given, only layers whose weight is among these parameters are tracked.
        sampling: how field layers are sampled (:data:`SAMPLINGS`): ``"steps"``, an explicit
            evaluation of the field at the solver's step starts (at most one per grid cell of
            ``sample_step``) and both ends; ``"stages"``, the solver's own evaluations, with no
            evaluation of its own.  See the module docstring.

    Attributes:
        layers: the :class:`TrackedLayer` records, field layers first.
        skipped: qualified name -> reason for every module with parameters that is not tracked.
        samples: samples taken since construction (``"stages"``: solver evaluations whose
            output gradients arrived).
        collect_time: seconds spent computing statistics since construction.
        sampling_mode: the ``sampling`` argument.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        sample_step: float = 0.01,
        full_precond: bool = True,
        params: Iterable[Tensor] | None = None,
        sampling: str = "steps",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be an nn.Module, but got {type(model).__name__}.")
        self.sample_step = _check_sample_step(sample_step)
        self.sampling_mode = check_sampling(sampling)
        self._seen: dict[int, FieldEvaluation] = {}
        self.full_precond = bool(full_precond)
        wanted = None if params is None else {id(p) for p in params}
        self.layers: list[TrackedLayer] = []
        self.skipped: dict[str, str] = {}
        self.samples = 0
        self.collect_time = 0.0
        self._armed = False
        self._recording = False
        self._blocks: dict[int, list[TrackedLayer]] = {}
        self._block_refs: list[ODEBlock] = []
        self._handles: list[Any] = []

        field_owner: dict[int, ODEBlock] = {}
        for _, ode_block in ode_blocks(model):
            self._blocks[id(ode_block)] = []
            self._block_refs.append(ode_block)
            for module in ode_block.func.modules():
                field_owner.setdefault(id(module), ode_block)
        outer: list[TrackedLayer] = []
        for name, module in model.named_modules():
            if isinstance(module, ODEBlock):
                continue
            adapter, reason = adapter_for(module)
            block = field_owner.get(id(module))
            if adapter is None:
                if reason is not None:
                    self.skipped[name] = reason
                continue
            if wanted is not None and id(module.weight) not in wanted:
                self.skipped[name] = "weight is not among the optimizer's parameters"
                continue
            if block is None and not self.full_precond:
                self.skipped[name] = "outside the ODE blocks and full_precond=False"
                continue
            layer = TrackedLayer(name, module, adapter, block)
            if block is None:
                outer.append(layer)
            else:
                self._blocks[id(block)].append(layer)
                self.layers.append(layer)
        self.layers.extend(outer)
        self._removed = False
        for block in self._block_refs:
            block.sampler = self

    # ------------------------------------------------------------ StateSampler
    def sampling(self, block: ODEBlock) -> bool:
        """True on refresh steps for a block with tracked layers."""
        return self._armed and bool(self._blocks.get(id(block)))

    def sample_spacing(self, block: ODEBlock) -> float:
        """``sample_step * (t1 - t0)``."""
        return self.sample_step * (block.t1 - block.t0)

    def stages(self, block: ODEBlock) -> bool:
        """True with ``sampling="stages"``: the block publishes the solver's evaluations."""
        return self.sampling_mode == "stages"

    def sample(self, block: ODEBlock, t: float, state: State, adjoint: State, call: object) -> None:
        """Add one sample of solve ``call``: evaluate the field at ``(t, state)``, pull ``adjoint``
        back to each layer."""
        layers = self._blocks.get(id(block))
        if not layers:
            return
        start = time.perf_counter()
        is_tuple = isinstance(state, tuple)
        states: tuple[Tensor, ...] = state if isinstance(state, tuple) else (state,)
        adjoints = adjoint if isinstance(adjoint, tuple) else (adjoint,)
        span = block.t1 - block.t0
        for layer in layers:
            layer.captures.clear()
        try:
            with torch.enable_grad():
                # Fields that differentiate inside (a CNF's trace) need a state that requires grad.
                x = tuple(s.detach().requires_grad_(s.is_floating_point()) for s in states)
                t_tensor = torch.as_tensor(t, dtype=x[0].dtype, device=x[0].device)
                self._recording = True
                try:
                    out = block.func(t_tensor, x if is_tuple else x[0])
                finally:
                    self._recording = False
                outs = out if isinstance(out, tuple) else (out,)
                pairs = [(o, a) for o, a in zip(outs, adjoints) if isinstance(o, Tensor) and o.requires_grad]
                captured = [(layer, z, h) for layer in layers for z, h in layer.captures if h.requires_grad]
                if pairs and captured:
                    grads = torch.autograd.grad(
                        [o for o, _ in pairs],
                        [h for _, _, h in captured],
                        grad_outputs=[a.to(o.dtype) for o, a in pairs],
                        allow_unused=True,
                    )
                else:
                    grads = ()
            for (layer, z, _), g in zip(captured, grads):
                if g is not None:
                    layer.add_sample(call, t, block.t0, block.t0 + span, z, g)
        finally:
            for layer in layers:
                layer.captures.clear()
            self.samples += 1
            self.collect_time += time.perf_counter() - start

    # ------------------------------------------------------------------ control
    @property
    def armed(self) -> bool:
        """Whether the next forward/backward pass collects statistics."""
        return self._armed

    def arm(self, refresh: bool, *, sample_step: float | None = None) -> None:
        """Collect (``refresh=True``) or not during the next forward/backward passes.

        Args:
            refresh: whether to collect.
            sample_step: a new grid spacing (fraction of the horizon), if given.
        """
        if sample_step is not None:
            self.sample_step = _check_sample_step(sample_step)
        self._armed = bool(refresh) and not self._removed
        if self._armed and not self._handles:
            self._handles = [
                layer.module.register_forward_hook(_LayerHook(self, layer)) for layer in self.layers
            ]
        elif not self._armed and self._handles:
            for handle in self._handles:
                handle.remove()
            self._handles = []

    def reset(self) -> None:
        """Forget the statistics of every layer."""
        for layer in self.layers:
            layer.reset()
        self._seen.clear()

    def remove(self) -> None:
        """Remove the hooks and uninstall the collector from the blocks it sampled."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._removed = True
        for block in self._block_refs:
            if block.sampler is self:
                block.sampler = None
        self._armed = False

    def __deepcopy__(self, memo: dict[int, Any]) -> None:
        # A deep-copied model is not tracked: its blocks get no sampler.
        return None

    def __reduce__(self) -> tuple[Any, ...]:
        return (_none, ())


def _none() -> None:
    return None


def check_sampling(value: Any) -> str:
    """Validate a ``sampling`` choice: one of :data:`SAMPLINGS`."""
    if not isinstance(value, str) or value not in SAMPLINGS:
        raise ValueError(f"`sampling` must be one of {list(SAMPLINGS)}, but got sampling={value!r}.")
    return value


def _check_sample_step(value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not 0 < value <= 1
    ):
        raise ValueError(
            "`sample_step` must be a number in (0, 1] (a fraction of the horizon), "
            f"but got sample_step={value!r}."
        )
    return float(value)
