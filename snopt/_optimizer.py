"""SNOpt: the Kronecker-factored second-order optimizer of Neural ODEs.

The math is a functional core of pure tensor functions (:func:`eigenbasis`,
:func:`eigenbases`, :func:`kronecker_scale`, :func:`kronecker_precondition`, :func:`running_average`,
:func:`kl_clip_factor`, and the reference form's :func:`initial_moment` and
:func:`precondition`); :class:`SNOpt` (a ``torch.optim.Optimizer``) and
:class:`SNOptPreconditioner` (in front of any torch optimizer) wrap it around a
:class:`~snopt._curvature.CurvatureCollector`.  Two curvature strategies, by name in
:data:`CURVATURES`:

``"kfac"`` (the default).  At every refresh the new factors join running averages
``A <- beta A + (1 - beta) A_new`` (and ``B``; ``beta`` is ``factor_decay``, the first
refresh takes ``A_new``), which are eigendecomposed ``A = U_A diag(a) U_A^T``,
``B = U_B diag(b) U_B^T``.  Every step the gradient ``G = [dW | db]`` of a tracked layer
is preconditioned with the Kronecker eigenvalues and a damping relative to the layer's own
spectrum::

    lambda = damping * mean(L b a^T) = damping * L mean(a) mean(b)
    G  <- U_B ((U_B^T G U_A) / (L b a^T + lambda)) U_A^T  =  (L A ⊗ B + lambda I)^-1 vec(G)

Because ``lambda`` scales with the spectrum, the direction does not depend on the scale
of the loss (a loss ``c L`` scales ``G`` by ``c`` and ``B`` by ``c^2``: the step shrinks by
``1 / c``, as a natural-gradient step does, and keeps its direction).  A KL trust region
(Ba, Grosse & Martens 2017) then scales the preconditioned gradients ``d`` of a param group
by ``nu = min(1, sqrt(kl_clip / (lr^2 sum_layers <d, G>)))``.

``"reference"`` (the paper's released code).  The eigenbasis of the factors of the
refresh step alone, and a running second moment that replaces the eigenvalues::

    G' = U_B^T G U_A
    m  <- alpha m + (1 - alpha) n G' * G'          (m = L b a^T right after a refresh)
    G  <- U_B (G' / (m + eps)) U_A^T

with ``n`` the batch size of the last refresh step (the layer hooks run on refresh steps
only) and ``L`` the number of locations of a conv layer (1 for a linear layer).  With
``alpha = 1`` the step is exactly ``(L A ⊗ B + eps I)^-1 vec(G)``.
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import Any, Union

import torch
from torch import Tensor, nn

from . import _defaults as D
from ._checks import flag, one_of
from ._curvature import CurvatureCollector, TrackedLayer, check_sampling

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
    round-off negative eigenvalues are clipped to 0.  One factor of :func:`eigenbases`.

    Args:
        factor: a square matrix.

    Returns:
        ``(eigenvalues, eigenvectors)`` in the factor's dtype and device, or None when the
        factor is not finite or the decomposition fails.
    """
    return eigenbases([factor])[0]


def eigenbases(factors: list[Tensor]) -> list[tuple[Tensor, Tensor] | None]:
    """:func:`eigenbasis` of every factor, one batched ``eigh`` per group of equal shape and device.

    Factors of the same size (the layers of a field are often the same width) are stacked
    and decomposed in one call; each group costs two host synchronisations (finiteness of
    the inputs and of the results), whatever its size.  A factor that is not finite gets
    None without holding back its group; when a batched decomposition does not converge,
    the group's factors are decomposed one at a time, so only the failing one gets None.

    Returns:
        one entry per factor, in order: ``(eigenvalues, eigenvectors)`` in the factor's dtype
        and device, or None.
    """
    out: list[tuple[Tensor, Tensor] | None] = [None] * len(factors)
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, factor in enumerate(factors):
        groups.setdefault((tuple(factor.shape), factor.device), []).append(i)
    for members in groups.values():
        stack = torch.stack([factors[i].detach().to(torch.float64) for i in members])
        stack = 0.5 * (stack + stack.transpose(1, 2))
        finite = torch.isfinite(stack).flatten(1).all(1).tolist()
        kept = [m for m, ok in zip(members, finite) if ok]
        if not kept:
            continue
        batch = stack[[j for j, ok in enumerate(finite) if ok]]
        decs: list[tuple[Tensor, Tensor] | None]
        try:
            values, vectors = torch.linalg.eigh(batch)
            decs = list(zip(values.unbind(0), vectors.unbind(0)))
        except RuntimeError:  # torch.linalg.LinAlgError: one of them did not converge
            decs = [_eigh_or_none(matrix) for matrix in batch]
        _store_finite(out, kept, decs, factors)
    return out


def _eigh_or_none(matrix: Tensor) -> tuple[Tensor, Tensor] | None:
    try:
        values, vectors = torch.linalg.eigh(matrix)
    except RuntimeError:
        return None
    return values, vectors


def _store_finite(
    out: list[tuple[Tensor, Tensor] | None],
    members: list[int],
    decs: list[tuple[Tensor, Tensor] | None],
    factors: list[Tensor],
) -> None:
    """Put each finite decomposition at its factor's place, clipped and cast like the factor."""
    present = [(i, d) for i, d in zip(members, decs) if d is not None]
    if not present:
        return
    ok = torch.stack([torch.isfinite(v).all() & torch.isfinite(u).all() for _, (v, u) in present]).tolist()
    for (i, (values, vectors)), good in zip(present, ok):
        if good:
            dtype = factors[i].dtype
            out[i] = values.clamp_min(0).to(dtype), vectors.to(dtype)


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


def kronecker_scale(eigenvalues_a: Tensor, eigenvalues_b: Tensor, locations: int, damping: float) -> Tensor:
    """``1 / (L b a^T + lambda)`` with ``lambda = damping * L mean(a) mean(b)``, shape ``[out, in (+1)]``.

    ``lambda`` is ``damping`` times the mean eigenvalue of ``L A ⊗ B``; a layer whose
    factors are all zero gets the scale 1 (the plain gradient).
    """
    kron = torch.outer(eigenvalues_b, eigenvalues_a) * locations
    lam = damping * kron.mean()
    scale = 1.0 / (kron + lam)
    return torch.where(lam > 0, scale, torch.ones_like(scale))


def kronecker_precondition(grad: Tensor, basis_a: Tensor, basis_b: Tensor, scale: Tensor) -> Tensor:
    """``U_B ((U_B^T G U_A) * scale) U_A^T``: with :func:`kronecker_scale` the damped Kronecker solve."""
    return basis_b @ ((basis_b.T @ grad @ basis_a) * scale) @ basis_a.T


def running_average(old: Tensor | None, new: Tensor, decay: float) -> Tensor:
    """``decay * old + (1 - decay) * new``, or ``new`` when there is no ``old`` yet."""
    if old is None:
        return new.clone()
    return old * decay + new * (1.0 - decay)


def kl_clip_factor(inner: Tensor, lr: float, kl_clip: float | None) -> Tensor | None:
    """The trust-region scale ``min(1, sqrt(kl_clip / (lr^2 inner)))`` (Ba et al. 2017).

    Args:
        inner: ``sum_layers <d, G>``, preconditioned gradients against gradients (a 0-d tensor).
        lr: the learning rate.
        kl_clip: the bound on the step's quadratic model of the KL, or None for no clip.

    Returns:
        A 0-d tensor in (0, 1] (1 where ``inner <= 0`` or ``lr == 0``), or None without a clip.
    """
    if kl_clip is None or lr == 0:
        return None
    ratio = kl_clip / (lr * lr * inner.clamp_min(torch.finfo(inner.dtype).tiny))
    return torch.where(inner > 0, ratio.sqrt().clamp(max=1.0), torch.ones_like(inner))


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
    "damping": ("a positive number", lambda v: v > 0),
    "factor_decay": ("a number in [0, 1)", lambda v: 0 <= v < 1),
    "kl_clip": ("a positive number or None", lambda v: v > 0),
    "diag_scale": ("a positive number", lambda v: v > 0),
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


def _check_optional(name: str, value: Any) -> Any:
    return None if value is None else _check_hyper(name, value)


def _check_growth(value: Any) -> float:
    return _check_value("update_growth", value, "a non-negative number", lambda v: v >= 0)


def _value(name: str, value: Any, step: int) -> Any:
    """A hyperparameter at ``step``: constants as they are (validated when set), schedules validated."""
    if value is None:
        return None
    if callable(value):
        return _resolve(name, value, step)
    return value


# ------------------------------------------------------------------ curvature strategies
class BaseCurvature(ABC):
    """How a tracked layer's factors become its preconditioner (one entry of :data:`CURVATURES`).

    A refresh has two halves so that the engine can decompose every layer's factors in one
    batched call (:func:`eigenbases`): ``to_decompose`` names the two matrices whose
    eigenbases the layer needs, ``install`` stores what the refresh computes from them in the
    layer's state (when both matrices could be decomposed; otherwise the state is kept).
    ``direction`` turns a gradient matrix into the preconditioned one.  ``hyper`` holds the step's resolved
    hyperparameters (``eps``, ``alpha``, ``damping``, ``factor_decay``, ``batch_size``).
    """

    @abstractmethod
    def to_decompose(
        self, state: dict[str, Any], a: Tensor, b: Tensor, hyper: dict[str, Any]
    ) -> tuple[Tensor, Tensor]:
        """The input-side and output-side matrices to eigendecompose for the new factors ``A``, ``B``."""

    @abstractmethod
    def install(
        self,
        state: dict[str, Any],
        matrices: tuple[Tensor, Tensor],
        decompositions: tuple[Tensor, Tensor, Tensor, Tensor],
        locations: int,
        hyper: dict[str, Any],
    ) -> None:
        """Store the refresh in ``state`` from ``matrices`` and their ``(a, U_A, b, U_B)``."""

    @abstractmethod
    def direction(
        self,
        state: dict[str, Any],
        grad: Tensor,
        hyper: dict[str, Any],
        batch_size: int,
        finite: Tensor | None,
    ) -> Tensor:
        """The preconditioned gradient; ``finite`` (a device flag) masks any state update."""


class ReferenceCurvature(BaseCurvature):
    """The paper's released code: eigenbasis of the refresh step, running second moment, absolute ``eps``."""

    def to_decompose(
        self, state: dict[str, Any], a: Tensor, b: Tensor, hyper: dict[str, Any]
    ) -> tuple[Tensor, Tensor]:
        return a, b

    def install(
        self,
        state: dict[str, Any],
        matrices: tuple[Tensor, Tensor],
        decompositions: tuple[Tensor, Tensor, Tensor, Tensor],
        locations: int,
        hyper: dict[str, Any],
    ) -> None:
        state["eigenvalues_a"], state["basis_a"], state["eigenvalues_b"], state["basis_b"] = decompositions
        state["moment"] = initial_moment(state["eigenvalues_a"], state["eigenvalues_b"], locations)
        state["batch_size"] = hyper["batch_size"]

    def direction(
        self,
        state: dict[str, Any],
        grad: Tensor,
        hyper: dict[str, Any],
        batch_size: int,
        finite: Tensor | None,
    ) -> Tensor:
        direction, moment = precondition(
            grad,
            state["basis_a"],
            state["basis_b"],
            state["moment"],
            eps=hyper["eps"],
            alpha=hyper["alpha"],
            batch_size=state.get("batch_size", batch_size),
        )
        state["moment"] = moment if finite is None else torch.where(finite, moment, state["moment"])
        return direction


class KroneckerCurvature(BaseCurvature):
    """Running-average factors across refreshes, Kronecker eigenvalues, damping relative to the spectrum."""

    def to_decompose(
        self, state: dict[str, Any], a: Tensor, b: Tensor, hyper: dict[str, Any]
    ) -> tuple[Tensor, Tensor]:
        decay = hyper["factor_decay"]
        factor_a = running_average(state.get("factor_a"), a, decay)
        return factor_a, running_average(state.get("factor_b"), b, decay)

    def install(
        self,
        state: dict[str, Any],
        matrices: tuple[Tensor, Tensor],
        decompositions: tuple[Tensor, Tensor, Tensor, Tensor],
        locations: int,
        hyper: dict[str, Any],
    ) -> None:
        state["factor_a"], state["factor_b"] = matrices
        state["eigenvalues_a"], state["basis_a"], state["eigenvalues_b"], state["basis_b"] = decompositions
        state["scale"] = kronecker_scale(
            state["eigenvalues_a"], state["eigenvalues_b"], locations, hyper["damping"]
        )

    def direction(
        self,
        state: dict[str, Any],
        grad: Tensor,
        hyper: dict[str, Any],
        batch_size: int,
        finite: Tensor | None,
    ) -> Tensor:
        return kronecker_precondition(grad, state["basis_a"], state["basis_b"], state["scale"])


#: Curvature strategies by name (``SNOpt(curvature=...)``).
CURVATURES: dict[str, BaseCurvature] = {"kfac": KroneckerCurvature(), "reference": ReferenceCurvature()}
#: Treatments of parameters without a Kronecker adapter (``SNOpt(untracked=...)``).
UNTRACKED = ("adam", "sgd")
#: The per-group hyperparameters of :class:`SNOpt` (``param_groups`` keys).
_GROUP_HYPERS = (
    "lr",
    "momentum",
    "weight_decay",
    "eps",
    "alpha",
    "damping",
    "factor_decay",
    "kl_clip",
    "diag_scale",
)
_ADAM_BETAS = (0.9, 0.999)
_ADAM_EPS = 1e-8


# ---------------------------------------------------------------------- engine
class _Engine:
    """Refresh schedule, decompositions and preconditioning shared by both public forms."""

    def __init__(
        self,
        model: nn.Module,
        *,
        curvature: str,
        update_freq: Any,
        update_growth: float,
        sample_step: Any,
        full_precond: bool,
        sampling: str,
        params: Iterable[Tensor] | None = None,
    ) -> None:
        self.curvature = CURVATURES[curvature]
        self.update_freq = update_freq
        self.update_growth = update_growth
        self.sample_step = sample_step
        self.collector = CurvatureCollector(
            model,
            sample_step=_resolve("sample_step", sample_step, 0),
            full_precond=full_precond,
            params=params,
            sampling=sampling,
        )
        self.steps = 0
        self.last_refresh: int | None = None
        self.counts = {"refreshes": 0, "skipped_steps": 0, "skipped_refreshes": 0}
        self.masked_skips: Tensor | None = None  # device-side count of masked non-finite steps
        self.reported_masked = 0
        self.decompose_time = 0.0
        self.collect_time_offset = 0.0
        self.samples_offset = 0
        self._grad_buffers: dict[int, Tensor] = {}
        self.arm()

    # -- schedule
    def interval(self, step: int) -> int:
        """Steps from the last refresh to the next: ``update_freq (1 + update_growth (refreshes - 1))``."""
        base = _resolve_update_freq(self.update_freq, step)
        return max(1, round(base * (1.0 + self.update_growth * max(self.counts["refreshes"] - 1, 0))))

    def is_refresh(self, step: int) -> bool:
        """Whether step ``step`` (0-based) refreshes the eigenbases."""
        if self.last_refresh is None:
            return True
        return step - self.last_refresh >= self.interval(step)

    def arm(self) -> None:
        refresh = self.is_refresh(self.steps)
        sample_step = _resolve("sample_step", self.sample_step, self.steps) if refresh else None
        self.collector.arm(refresh, sample_step=sample_step)

    # -- one step
    def refresh(
        self,
        state_for: Callable[[TrackedLayer], dict[str, Any]],
        hyper_for: Callable[[TrackedLayer], dict[str, Any] | None],
    ) -> list[str]:
        """Fold the factors gathered in this step into each layer's preconditioner; return warnings."""
        messages = []
        start = time.perf_counter()
        pending = []
        for layer in self.collector.layers:
            factors = layer.factors()
            hyper = hyper_for(layer)
            if factors is None or hyper is None:
                continue
            a, b, locations = factors
            hyper = dict(hyper, batch_size=layer.batch_size)
            state = state_for(layer)
            pending.append((layer, state, self.curvature.to_decompose(state, a, b, hyper), locations, hyper))
        # Every layer's factors in one batched eigendecomposition per shape (eigenbases).
        decs = eigenbases([m for *_, matrices, _, _ in pending for m in matrices])
        for k, (layer, state, matrices, locations, hyper) in enumerate(pending):
            dec_a, dec_b = decs[2 * k], decs[2 * k + 1]
            if dec_a is None or dec_b is None:
                messages.append(layer.name)
                continue
            self.curvature.install(state, matrices, (*dec_a, *dec_b), locations, hyper)
        self.decompose_time += time.perf_counter() - start
        self.collector.reset()
        self.last_refresh = self.steps
        self.counts["refreshes"] += 1
        if messages:
            self.counts["skipped_refreshes"] += 1
            return [
                f"SNOpt: the curvature factors of layer(s) {messages} are not finite (or could not be "
                f"decomposed) at step {self.steps + 1}; this refresh is skipped for them and their "
                "previous preconditioner is kept (the identity before the first refresh)."
            ]
        return []

    def _grad_matrix(self, layer: TrackedLayer) -> Tensor:
        """``[dW | db]`` in a persistent buffer (a view of ``dW`` for a layer without bias)."""
        weight = layer.weight
        grad = weight.grad.reshape(weight.shape[0], -1)  # type: ignore[union-attr]
        bias = layer.bias
        if bias is None:
            return grad
        buf = self._grad_buffers.get(id(layer))
        if buf is None or buf.shape != (grad.shape[0], grad.shape[1] + 1) or buf.dtype != grad.dtype:
            buf = self._grad_buffers[id(layer)] = grad.new_empty(grad.shape[0], grad.shape[1] + 1)
        buf[:, :-1].copy_(grad)
        if bias.grad is None:
            buf[:, -1].zero_()
        else:
            buf[:, -1].copy_(bias.grad)
        return buf

    def directions(
        self,
        state_for: Callable[[TrackedLayer], dict[str, Any]],
        hyper_for: Callable[[TrackedLayer], dict[str, Any] | None],
        finite: Tensor | None = None,
    ) -> tuple[dict[Tensor, Tensor], dict[Tensor, Tensor]]:
        """Preconditioned gradients of the tracked layers that have a gradient, by parameter,
        and ``<d, G>`` of each layer, by its weight (for the KL clip)."""
        out: dict[Tensor, Tensor] = {}
        inner: dict[Tensor, Tensor] = {}
        for layer in self.collector.layers:
            weight = layer.weight
            if weight.grad is None:
                continue
            hyper = hyper_for(layer)
            if hyper is None:
                continue
            state = state_for(layer)
            grad = self._grad_matrix(layer)
            if "basis_a" not in state:
                _identity_state(state, grad)
            direction = self.curvature.direction(state, grad, hyper, layer.batch_size, finite)
            inner[weight] = torch.vdot(direction.reshape(-1), grad.reshape(-1))
            dw, db = layer.adapter.split(layer.module, direction)
            out[weight] = dw
            bias = layer.bias
            if db is not None and bias is not None:
                out[bias] = db
        return out, inner

    def discard(self) -> None:
        """Drop this step's statistics (a skipped step)."""
        self.collector.reset()
        self.counts["skipped_steps"] += 1

    def mask(self, finite: Tensor) -> None:
        """Count a step whose finiteness is known on the device only."""
        skipped = (~finite).to(torch.int64)
        self.masked_skips = skipped if self.masked_skips is None else self.masked_skips + skipped

    def new_masked_skips(self) -> int:
        """Masked non-finite steps since the last call (a host sync: called on refresh steps)."""
        total = 0 if self.masked_skips is None else int(self.masked_skips)
        new, self.reported_masked = total - self.reported_masked, total
        return new

    def finish(self) -> None:
        self.steps += 1
        self.arm()

    # -- bookkeeping
    @property
    def stats(self) -> dict[str, float]:
        masked = 0 if self.masked_skips is None else int(self.masked_skips)
        return {
            "refreshes": self.counts["refreshes"],
            "skipped_steps": self.counts["skipped_steps"] + masked,
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
        self.masked_skips = None
        self.reported_masked = 0
        self.decompose_time = float(stats.get("decompose_time", 0.0))
        self.collect_time_offset = float(stats.get("collect_time", 0.0)) - self.collector.collect_time
        self.samples_offset = int(stats.get("samples", 0)) - self.collector.samples
        self.collector.reset()
        self.arm()


def _identity_state(state: dict[str, Any], grad: Tensor) -> None:
    """The preconditioner before any refresh: identity factors (unit eigenvalues), the plain gradient."""
    out, inp = grad.shape
    dtype, device = grad.dtype, grad.device
    state["basis_a"] = torch.eye(inp, dtype=dtype, device=device)
    state["basis_b"] = torch.eye(out, dtype=dtype, device=device)
    state["eigenvalues_a"] = torch.ones(inp, dtype=dtype, device=device)
    state["eigenvalues_b"] = torch.ones(out, dtype=dtype, device=device)
    state["moment"] = torch.ones(out, inp, dtype=dtype, device=device)
    state["scale"] = torch.ones(out, inp, dtype=dtype, device=device)


def _all_finite(grads: list[Tensor]) -> Tensor | None:
    """A device flag: every gradient is finite (no host sync), or None without gradients."""
    if not grads:
        return None
    norms = torch.stack(
        [torch.linalg.vector_norm(g.detach(), dtype=torch.float64).to(grads[0].device) for g in grads]
    )
    return torch.isfinite(norms).all()


def _grads_finite(grads: list[Tensor]) -> bool:
    finite = _all_finite(grads)
    return True if finite is None else bool(finite)


# ---------------------------------------------------------------------- SNOpt
class SNOpt(torch.optim.Optimizer):
    """The Second-order Neural ODE Optimizer (Liu, Chen & Theodorou, NeurIPS 2021).

    A Kronecker-factored preconditioner whose factors, for the layers of ODE vector fields,
    are collected along the backward solve (see :mod:`snopt._curvature`), followed by SGD
    with momentum and weight decay.  On refresh steps (the first included, then after
    ``update_freq`` steps, an interval that grows by ``update_growth * update_freq`` after
    every refresh: frequent early, sparse later) the factors of that step are collected and
    folded into the preconditioner; every step the gradient of each tracked layer is
    preconditioned (``curvature``: ``"kfac"`` or ``"reference"``, see the module docstring).

    Every parameter gets a step at its own scale.  Parameters without a Kronecker adapter
    (norm layers, RNN cells, embeddings, and outer layers with ``full_precond=False``) get,
    with ``untracked="adam"``, Adam's diagonal second-moment step (betas 0.9 / 0.999, eps
    1e-8, bias-corrected, weight decay added to the gradient) at learning rate
    ``lr * diag_scale``, and no SNOpt momentum (Adam has its own); with
    ``untracked="sgd"`` they get plain SGD-momentum at ``lr``.  The default ``diag_scale``
    makes their step Adam's default learning rate at SNOpt's default ``lr``.

    The step has no host synchronisation except on refresh steps (which decompose on the
    host anyway): non-finite gradients on other steps are masked on the device (parameters
    and states keep their values) and reported by a warning at the next refresh and in
    :attr:`stats`; on a refresh step the step is skipped with a warning at once.

    The optimizer arms its collector at construction and at the end of every
    :meth:`step`, for the forward and backward passes that come before the next step.
    Build it before the first forward pass of training.  Losses are assumed to be
    averaged over the batch (torch's default reductions).

    Every hyperparameter except ``curvature``, ``update_growth``, ``sampling``, ``untracked``
    and ``full_precond`` may be a constant or a schedule: a callable of the 0-based step index
    returning the value (validated at step 0 and at every use; to save a state with
    ``torch.save``, use picklable module-level functions).  ``damping`` and
    ``factor_decay`` are read on refresh steps.  LR schedulers work on a constant ``lr`` as
    with any torch optimizer; a scheduler may anneal it to 0.  Parameters added later with
    :meth:`add_param_group` are untracked (their layers have no collector hooks).  A second
    SNOpt or :class:`SNOptPreconditioner` built on the same model takes over its ODE
    blocks; call ``collector.remove()`` on the old one.

    Args:
        model: the model whose layers are preconditioned; its ODE blocks get the collector
            as their sampler.
        lr: learning rate (> 0).
        momentum: momentum factor, in [0, 1).
        weight_decay: L2 penalty added to the preconditioned gradient (>= 0).
        curvature: ``"kfac"`` or ``"reference"`` (:data:`CURVATURES`).
        damping: ``"kfac"``: damping as a fraction of each layer's mean Kronecker eigenvalue (> 0).
        factor_decay: ``"kfac"``: weight of the previous running factors at a refresh, in [0, 1).
        kl_clip: ``"kfac"`` and ``"reference"``: trust-region bound on ``lr^2 sum <d, G>``
            per param group (> 0), None for none, or ``"auto"``: 1e-3 for ``"kfac"`` and
            1e-2 for ``"reference"`` (``snopt._defaults.KL_CLIP``, with the measurement behind it).
        eps: ``"reference"``: damping added to the second moment (> 0).
        update_freq: steps from the first refresh to the second (positive integer).
        update_growth: growth of the refresh interval per refresh, in units of
            ``update_freq`` (>= 0; 0 keeps it constant).
        alpha: ``"reference"``: decay of the running second moment, in [0, 1].
        sample_step: spacing of the curvature samples along the backward solve, as a
            fraction of the horizon, in (0, 1] (``sampling="steps"``).
        sampling: ``"steps"`` (an explicit field evaluation per sample, at the adjoint
            solve's step starts) or ``"stages"`` (the solver's own evaluations on refresh
            steps, no extra evaluation); see :mod:`snopt._curvature`.
        full_precond: also precondition the layers outside the ODE blocks.
        untracked: ``"adam"`` or ``"sgd"``: the step of parameters without curvature.
        diag_scale: ratio of the untracked parameters' Adam learning rate to ``lr`` (> 0).
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
        lr: Schedule = D.LR["snopt"],
        momentum: Schedule = D.SNOPT["momentum"],
        weight_decay: Schedule = D.SNOPT["weight_decay"],
        *,
        curvature: str = D.SNOPT["curvature"],
        damping: Schedule = D.SNOPT["damping"],
        factor_decay: Schedule = D.SNOPT["factor_decay"],
        kl_clip: Schedule | str | None = D.SNOPT["kl_clip"],
        eps: Schedule = D.SNOPT["eps"],
        update_freq: int | Callable[[int], int] = D.SNOPT["update_freq"],
        update_growth: float = D.SNOPT["update_growth"],
        alpha: Schedule = D.SNOPT["alpha"],
        sample_step: Schedule = D.SNOPT["sample_step"],
        sampling: str = D.SNOPT["sampling"],
        full_precond: bool = D.SNOPT["full_precond"],
        untracked: str = D.SNOPT["untracked"],
        diag_scale: Schedule = D.SNOPT["diag_scale"],
        params: Iterable[Any] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be an nn.Module, but got {type(model).__name__}.")
        self.curvature = one_of("curvature", curvature, sorted(CURVATURES))
        if isinstance(kl_clip, str) and kl_clip != "auto":
            raise ValueError(
                f"`kl_clip` must be a positive number, None or 'auto', but got kl_clip={kl_clip!r}."
            )
        defaults = dict(
            lr=_check_hyper("lr", lr),
            momentum=_check_hyper("momentum", momentum),
            weight_decay=_check_hyper("weight_decay", weight_decay),
            eps=_check_hyper("eps", eps),
            alpha=_check_hyper("alpha", alpha),
            damping=_check_hyper("damping", damping),
            factor_decay=_check_hyper("factor_decay", factor_decay),
            kl_clip=_check_optional("kl_clip", D.KL_CLIP[curvature] if kl_clip == "auto" else kl_clip),
            diag_scale=_check_hyper("diag_scale", diag_scale),
        )
        self.untracked = one_of("untracked", untracked, sorted(UNTRACKED))
        self.update_freq = _check_update_freq(update_freq)
        self.update_growth = _check_growth(update_growth)
        self.sample_step = _check_hyper("sample_step", sample_step)
        self.sampling = check_sampling(sampling)
        self.full_precond = flag("full_precond", full_precond)
        super().__init__(model.parameters() if params is None else params, defaults)
        optimized = [p for group in self.param_groups for p in group["params"]]
        self._engine = _Engine(
            model,
            curvature=self.curvature,
            update_freq=self.update_freq,
            update_growth=self.update_growth,
            sample_step=self.sample_step,
            full_precond=self.full_precond,
            sampling=self.sampling,
            params=optimized,
        )
        self.collector = self._engine.collector

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group; its own hyperparameters are validated like the constructor's."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for name in _GROUP_HYPERS:
            if group[name] is not self.defaults[name]:  # a value of the group's own (defaults are checked)
                group[name] = (_check_optional if name == "kl_clip" else _check_hyper)(name, group[name])

    @property
    def stats(self) -> dict[str, float]:
        """Counters: ``refreshes``, ``skipped_steps``, ``skipped_refreshes``, ``samples``, and
        ``collect_time`` / ``decompose_time`` in seconds (reading them syncs with the device)."""
        return self._engine.stats

    @property
    def steps(self) -> int:
        """Steps taken so far (skipped steps included)."""
        return self._engine.steps

    def _hypers(self, step: int) -> list[dict[str, Any]]:
        """Each group's hyperparameters at ``step``, resolved once per step."""
        return [{k: _value(k, group[k], step) for k in _GROUP_HYPERS} for group in self.param_groups]

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
        hypers = self._hypers(step)
        index = {id(p): i for i, group in enumerate(self.param_groups) for p in group["params"]}

        def hyper_for(layer: TrackedLayer) -> dict[str, Any] | None:
            i = index.get(id(layer.weight))
            return None if i is None else hypers[i]

        finite: Tensor | None = None
        if engine.collector.armed:
            if not _grads_finite(grads):  # a refresh step syncs anyway
                engine.discard()
                engine.finish()
                _warn(
                    f"SNOpt: non-finite gradients at step {step + 1}; the step is skipped "
                    f"({self.stats['skipped_steps']} skipped so far, see `optimizer.stats`)."
                )
                return loss
            masked = engine.new_masked_skips()
            if masked:
                _warn(
                    f"SNOpt: {masked} step(s) before step {step + 1} had non-finite gradients and "
                    "were skipped (see `optimizer.stats`)."
                )
            for message in engine.refresh(lambda layer: self.state[layer.weight], hyper_for):
                _warn(message)
        else:
            finite = _all_finite(grads)
            if finite is not None:
                engine.mask(finite)
        directions, inner = engine.directions(lambda layer: self.state[layer.weight], hyper_for, finite)
        for group, hyper in zip(self.param_groups, hypers):
            self._update_group(group, hyper, directions, inner, finite)
        engine.finish()
        return loss

    def _update_group(
        self,
        group: dict[str, Any],
        hyper: dict[str, Any],
        directions: dict[Tensor, Tensor],
        inner: dict[Tensor, Tensor],
        finite: Tensor | None,
    ) -> None:
        lr, momentum, weight_decay = hyper["lr"], hyper["momentum"], hyper["weight_decay"]
        terms = [inner[p] for p in group["params"] if p in inner]
        nu = kl_clip_factor(torch.stack(terms).sum(), lr, hyper["kl_clip"]) if terms else None
        for p in group["params"]:
            if p.grad is None:
                continue
            d = directions.get(p)
            if d is None:
                if self.untracked == "adam":
                    self._adam(p, lr * hyper["diag_scale"], weight_decay, finite)
                    continue
                d = p.grad
            elif nu is not None:
                d = d * nu
            if weight_decay != 0:
                d = d.add(p, alpha=weight_decay)
            if momentum != 0:
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    zero = torch.zeros_like(d)
                    buf = state["momentum_buffer"] = (
                        d.clone() if finite is None else torch.where(finite, d, zero)
                    )
                elif finite is None:
                    buf.mul_(momentum).add_(d)
                else:
                    buf.copy_(torch.where(finite, buf * momentum + d, buf))
                d = buf
            if finite is not None:
                d = torch.where(finite, d, torch.zeros_like(d))
            p.add_(d, alpha=-lr)

    def _adam(self, p: Tensor, lr: float, weight_decay: float, finite: Tensor | None) -> None:
        """Adam's step on an untracked parameter (masked on the device when ``finite`` is given)."""
        beta1, beta2 = _ADAM_BETAS
        state = self.state[p]
        if "exp_avg" not in state:
            state["step"] = torch.zeros((), dtype=p.dtype, device=p.device)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        grad: Tensor = p.grad if weight_decay == 0 else p.grad.add(p, alpha=weight_decay)  # type: ignore[assignment,union-attr]
        count, exp_avg, exp_avg_sq = state["step"], state["exp_avg"], state["exp_avg_sq"]
        if finite is None:
            count.add_(1)
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        else:
            count.add_(finite.to(count.dtype))
            exp_avg.copy_(torch.where(finite, exp_avg.lerp(grad, 1 - beta1), exp_avg))
            exp_avg_sq.copy_(torch.where(finite, exp_avg_sq * beta2 + (1 - beta2) * grad * grad, exp_avg_sq))
        update = (exp_avg / (1 - beta1**count)) / ((exp_avg_sq / (1 - beta2**count)).sqrt() + _ADAM_EPS)
        if finite is not None:
            update = torch.where(finite, update, torch.zeros_like(update))
        p.add_(update, alpha=-lr)

    def state_dict(self) -> dict[str, Any]:
        """The torch optimizer state (preconditioners, second moments, momentum and Adam
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
    :class:`SNOpt` with ``kl_clip=None`` and ``untracked="sgd"`` (the trust region needs the
    learning rate, and untracked parameters are the optimizer's own business).  On
    non-finite gradients ``step()`` warns, counts the step in :attr:`stats` and sets every
    gradient of the model to None, so that the optimizer behind skips the step; this
    check syncs with the device once per step.

    Args:
        model: the model (its ODE blocks get the collector as their sampler).
        curvature: ``"kfac"`` or ``"reference"``.
        damping: ``"kfac"``: relative damping (> 0), constant or schedule.
        factor_decay: ``"kfac"``: running-average weight of the factors, in [0, 1).
        eps: ``"reference"``: damping (> 0), constant or schedule.
        update_freq: steps to the second refresh (positive integer), constant or schedule.
        update_growth: growth of the refresh interval per refresh (>= 0).
        alpha: ``"reference"``: decay of the second moment, in [0, 1].
        sample_step: spacing of the curvature samples, a fraction of the horizon in (0, 1].
        sampling: ``"steps"`` or ``"stages"`` (see :class:`SNOpt`).
        full_precond: also precondition the layers outside the ODE blocks.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        curvature: str = D.SNOPT["curvature"],
        damping: Schedule = D.SNOPT["damping"],
        factor_decay: Schedule = D.SNOPT["factor_decay"],
        eps: Schedule = D.SNOPT["eps"],
        update_freq: int | Callable[[int], int] = D.SNOPT["update_freq"],
        update_growth: float = D.SNOPT["update_growth"],
        alpha: Schedule = D.SNOPT["alpha"],
        sample_step: Schedule = D.SNOPT["sample_step"],
        sampling: str = D.SNOPT["sampling"],
        full_precond: bool = D.SNOPT["full_precond"],
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be an nn.Module, but got {type(model).__name__}.")
        self.model = model
        self.curvature = one_of("curvature", curvature, sorted(CURVATURES))
        self.hyper = {
            "eps": _check_hyper("eps", eps),
            "alpha": _check_hyper("alpha", alpha),
            "damping": _check_hyper("damping", damping),
            "factor_decay": _check_hyper("factor_decay", factor_decay),
        }
        self.update_freq = _check_update_freq(update_freq)
        self.update_growth = _check_growth(update_growth)
        self.sample_step = _check_hyper("sample_step", sample_step)
        self.sampling = check_sampling(sampling)
        self.full_precond = flag("full_precond", full_precond)
        self._engine = _Engine(
            model,
            curvature=self.curvature,
            update_freq=self.update_freq,
            update_growth=self.update_growth,
            sample_step=self.sample_step,
            full_precond=self.full_precond,
            sampling=self.sampling,
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
        hyper = {k: _value(k, v, step) for k, v in self.hyper.items()}
        if engine.collector.armed:
            for message in engine.refresh(self._state_for, lambda layer: hyper):
                _warn(message)
        directions, _ = engine.directions(self._state_for, lambda layer: hyper)
        param: Any
        for param, d in directions.items():
            if param.grad is None:  # a bias without gradient: its column was preconditioned as zeros
                param.grad = d.clone()
            else:
                param.grad.copy_(d)
        engine.finish()

    def state_dict(self) -> dict[str, Any]:
        """Step counter, last refresh, stats and every layer's preconditioner state."""
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
