"""Every default setting of snopt, in one place, importable without torch.

The classes take their signature defaults from here (:class:`snopt.ODEBlock`, the
optimizers built by :func:`snopt.build_run`, :class:`snopt.Controller` and its policies),
and :class:`snopt.RunConfig`, the command line, the studies and the MLflow project read
them from here, so a user who switches between the library and ``snopt train`` gets the
same run.  ``tests/snopt/test_defaults.py`` checks the class signatures against this file.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

#: Built-in task names (:func:`snopt.get_task`).
TASKS = ("digits", "toy2d", "timeseries", "multiblock")

#: torchdiffeq methods with adaptive steps, and with a fixed grid.
ADAPTIVE_METHODS = ("adaptive_heun", "bosh3", "dopri5", "dopri8", "fehlberg2")
FIXED_METHODS = (
    "euler",
    "explicit_adams",
    "fixed_adams",
    "heun2",
    "heun3",
    "implicit_adams",
    "midpoint",
    "rk4",
)
#: Every method an :class:`snopt.ODEBlock` accepts.
METHODS = ADAPTIVE_METHODS + FIXED_METHODS

#: :class:`snopt.ODEBlock`: start and end time, solver and tolerances, adjoint mode, and the cap
#: on field evaluations per solve (a healthy solve takes tens to a few hundred; a diverging one
#: runs into the cap in seconds instead of burning tens of thousands of evaluations).
ODE: MappingProxyType[str, Any] = MappingProxyType(
    {
        "t0": 0.0,
        "t1": 1.0,
        "method": "dopri5",
        "rtol": 1e-3,
        "atol": 1e-3,
        "adjoint": True,
        "max_nfe": 10_000,
    }
)

#: Parameter optimizers a run can use.
OPTIMIZERS = ("adam", "sgd", "snopt")
#: Learning rate of each optimizer when a run gives none.
LR: MappingProxyType[str, float] = MappingProxyType({"adam": 1e-2, "sgd": 0.1, "snopt": 0.1})
#: Momentum of each optimizer that has one, when a run gives none.
MOMENTUM: MappingProxyType[str, float] = MappingProxyType({"sgd": 0.9, "snopt": 0.0})

#: :class:`snopt.SNOpt`'s keyword defaults (its ``lr`` is :data:`LR` ``["snopt"]``).  ``eps`` and
#: ``alpha`` belong to ``curvature="reference"``, ``damping`` and ``factor_decay`` to ``"kfac"``;
#: ``diag_scale`` makes the untracked parameters' Adam step Adam's default learning rate.
#: ``kl_clip`` ``"auto"`` is :data:`KL_CLIP` of the curvature.  ``sampling`` is where the field
#: layers' curvature is sampled (see :mod:`snopt._curvature`).  ``"stages"`` (the adjoint solve's
#: own evaluations: 32 samples per refresh on digits instead of 5, 142 instead of 30 on the time
#: series) tied ``"steps"`` on NFE to Adam's targets over 3 paired seeds (smoothed train loss
#: 1.16 vs 1.15x Adam on digits, 0.87 vs 0.87x on the time series; val loss 1.07 vs 1.34x and
#: 0.79 vs 0.88x; ``benchmarks/optimizer_variants.py``, parts ``variants_stages_*.json``), at
#: 2.3% of the run time in collection instead of 0.5%: not a clear win, so ``"steps"`` stays.
SNOPT: MappingProxyType[str, Any] = MappingProxyType(
    {
        "momentum": MOMENTUM["snopt"],
        "weight_decay": 0.0,
        "curvature": "kfac",
        "damping": 0.1,
        "factor_decay": 0.5,
        "kl_clip": "auto",
        "eps": 0.05,
        "update_freq": 10,
        "update_growth": 0.5,
        "alpha": 0.75,
        "sample_step": 0.01,
        "sampling": "steps",
        "full_precond": True,
        "untracked": "adam",
        "diag_scale": LR["adam"] / LR["snopt"],
    }
)

#: SNOpt's trust region ``kl_clip`` per curvature.  1e-3 for ``"kfac"``, not Ba et al.'s 1e-2:
#: the Kronecker model underestimates the curvature of an ODE-RNN's field (``lr^2 <d, G>``
#: reached 1e3 at lr 0.1, median 0.25); at 1e-2 its field layers moved 70-200% of their norm in
#: one step and 3 of 6 time-series seeds diverged (benchmarks/results/optimizers.md), while 1e-3
#: left digits and toy2d as fast on 2 seeds each.  The reference form keeps 1e-2.
KL_CLIP: MappingProxyType[str, float] = MappingProxyType({"kfac": 1e-3, "reference": 1e-2})

#: Policies of :class:`snopt.Controller`, and the costs on the horizons.
POLICIES = ("fixed", "gradient", "feedback")
COSTS = ("quadratic", "linear")
#: Curvature estimators of the feedback policy (see :mod:`snopt.control`).
CURVATURES = ("gauss_newton", "fisher")
#: Step size ``eta`` of each policy when none is given.  The feedback policy's is a full
#: Gauss-Newton step.  The gradient policy's (in units of T per unit of ``Q_phi``, so it depends on
#: the loss's scale) is the step of the grid 0.3, 1, 3, 10 of ``benchmarks/horizon_closed_form.py``
#: that settles within 5% of T* on the most closed-form problems and starts
#: (``benchmarks/results/horizon_closed_form.md``, "The gradient policy's step"); the former 3.0
#: settled on none, with 91-99% of its updates cut by the trust region.
POLICY_LR: MappingProxyType[str, float] = MappingProxyType({"gradient": 0.3, "feedback": 1.0})
#: :class:`snopt.Controller`'s defaults.
CONTROL: MappingProxyType[str, Any] = MappingProxyType(
    {
        "policy": "feedback",
        "penalty": 1e-3,
        "cost": "quadratic",
        "every": 5,
        "momentum": 0.9,
        "max_step": 0.5,
        "warmup": 10,
        "curvature": "gauss_newton",
        "feedback": True,
    }
)

#: What :class:`snopt.RunConfig` (``snopt train``, the base run of the studies, the MLflow project)
#: trains with when told nothing: Adam and fixed horizons.  SNOpt is not the default optimizer
#: because it has not earned it yet: it missed the issue-12 goal of 0.6x Adam's NFE on every task
#: of ``benchmarks/results/optimizers.md`` (NFE to reach Adam's accuracy: 0.92x Adam's on digits,
#: 1.13x on digits512).  The horizons stay fixed because a plain run trains the architecture it is
#: given; moving T is asked for with ``--control feedback`` (or ``gradient``), as it is in the
#: library by building a :class:`snopt.Controller`, whose own policy default (:data:`CONTROL`) is
#: ``feedback``.
RUN: MappingProxyType[str, str] = MappingProxyType({"optimizer": "adam", "control": "fixed"})

#: The training budget and run settings of :class:`snopt.RunConfig` (``snopt train``).
TRAINING: MappingProxyType[str, Any] = MappingProxyType(
    {"epochs": 3, "batch_size": 64, "seed": 0, "device": "cpu"}
)
