"""Tasks: a data set, a model family, a loss and a validation metric, behind one interface.

Every task is small enough to train on a CPU in seconds per epoch and needs no download:
``digits`` (scikit-learn's bundled 8x8 digits, classification with an ODE classifier),
``toy2d`` (2-d densities fitted by a continuous normalizing flow) and ``timeseries``
(forecasting irregularly sampled, partially observed damped oscillations with an ODE-RNN).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from ._checks import integer
from ._defaults import TASKS
from ._models import CNF, ODERNN, MultiBlockClassifier, ODEClassifier

Batch = Sequence[Tensor]


def _check_fraction(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise ValueError(f"`{name}` must be a number in (0, 1), but got {name}={value!r}.")
    return float(value)


def _check_seed(seed: object) -> int:
    return integer("seed", seed, low=0)


def _make_loaders(
    train: Sequence[Tensor], val: Sequence[Tensor], batch_size: int, seed: int
) -> tuple[DataLoader, DataLoader]:
    """A shuffled training loader (order fixed by ``seed``) and an ordered validation loader."""
    batch_size = integer("batch_size", batch_size)
    generator = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(TensorDataset(*train), batch_size=batch_size, shuffle=True, generator=generator)
    val_loader = DataLoader(TensorDataset(*val), batch_size=batch_size, shuffle=False)
    return train_loader, val_loader


def _model_device_dtype(model: nn.Module) -> tuple[torch.device | None, torch.dtype | None]:
    for p in model.parameters():
        return p.device, p.dtype
    return None, None


class Task(ABC):
    """A learning problem: data loaders, a model builder, a loss and a validation metric.

    Attributes:
        name: the task's name in :func:`get_task`.
        metric_name: name of the validation metric returned by :meth:`evaluate`.
        higher_is_better: whether a larger metric is better.
    """

    name: str
    metric_name: str
    higher_is_better: bool

    @abstractmethod
    def build_model(self, *args: Any, **hparams: Any) -> nn.Module:
        """A fresh model for this task; the keyword arguments are its hyperparameters."""

    @abstractmethod
    def loaders(self, batch_size: int, *, seed: int = 0) -> tuple[DataLoader, DataLoader]:
        """Training and validation loaders.

        Args:
            batch_size: samples per batch (>= 1).
            seed: fixes the data, the train/validation split and the training shuffle order
                (through a ``torch.Generator``), so equal seeds give equal batches.

        Returns:
            ``(train_loader, val_loader)``; batches are tuples of tensors.
        """

    @abstractmethod
    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """The mean loss of ``model`` on ``batch``: a differentiable scalar."""

    def _evaluate_batch(self, model: nn.Module, batch: Batch) -> tuple[float, float, int]:
        """Summed loss, summed metric and sample count of one batch (metric = loss by default)."""
        n = int(batch[0].shape[0])
        loss = float(self.loss(model, batch)) * n
        return loss, loss, n

    def evaluate(self, model: nn.Module, loader: DataLoader) -> dict[str, float]:
        """Validation loss and metric of ``model`` over ``loader``, averaged over samples.

        Runs under ``torch.no_grad()`` with ``model.eval()``, then restores the model's
        training mode.  Batches are moved to the device (and floating dtype) of the model's
        parameters.

        Args:
            model: a model built by :meth:`build_model`.
            loader: a loader from :meth:`loaders`.

        Returns:
            ``{"val_loss": ..., "metric": ...}``; the metric is the one named by
            :attr:`metric_name`.
        """
        device, dtype = _model_device_dtype(model)
        was_training = model.training
        model.eval()
        loss_sum = metric_sum = 0.0
        count = 0
        try:
            with torch.no_grad():
                for batch in loader:
                    if device is not None:
                        batch = self.batch_to(batch, device, dtype=dtype)
                    loss, metric, n = self._evaluate_batch(model, batch)
                    loss_sum += loss
                    metric_sum += metric
                    count += n
        finally:
            model.train(was_training)
        if count == 0:
            raise ValueError("`loader` yielded no samples.")
        return {"val_loss": loss_sum / count, "metric": metric_sum / count}

    def null_metric(self, *, seed: int = 0) -> float:
        """The validation metric of a model that learned nothing from its inputs.

        A level every trained model should beat: the fixed reference point of the Pareto
        hypervolumes of :mod:`snopt.search`, so that no strategy's result sets it.

        Args:
            seed: the data seed (as in :meth:`loaders`).

        Raises:
            NotImplementedError: the task defines none.
        """
        raise NotImplementedError(
            f"{type(self).__name__} defines no null_metric (the metric of a model that learned nothing); "
            "override Task.null_metric to compare Pareto hypervolumes on it."
        )

    def _val_tensors(self, seed: int) -> list[Tensor]:
        """The validation split's tensors, whole (one per batch element)."""
        _, val = self.loaders(batch_size=1024, seed=seed)
        batches = list(val)
        return [torch.cat([b[i] for b in batches]) for i in range(len(batches[0]))]

    @staticmethod
    def batch_to(
        batch: Batch, device: torch.device | str, dtype: torch.dtype | None = None
    ) -> tuple[Tensor, ...]:
        """Move every tensor of a batch to ``device``.

        Args:
            batch: a tuple or list of tensors.
            device: the target device.
            dtype: if given, floating-point tensors are also cast to it (integer labels are not).

        Returns:
            The moved tensors as a tuple.
        """
        if not isinstance(batch, (tuple, list)):
            raise TypeError(f"`batch` must be a tuple or list of tensors, but got {type(batch).__name__}.")
        return tuple(
            t.to(device=device, dtype=dtype) if dtype is not None and t.is_floating_point() else t.to(device)
            for t in batch
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


#: Images in scikit-learn's digits data set (tests check it against the data).
_DIGITS_IMAGES = 1797


def _check_split(name: str, fraction: float, n: int, classes: int) -> int:
    """The samples left after holding out ``fraction`` of ``n`` in a stratified split.

    Raises ``ValueError`` naming ``name`` when either side would get fewer samples than
    there are classes (scikit-learn's split needs one of each).
    """
    held = math.ceil(fraction * n)  # as scikit-learn's train_test_split rounds
    if min(held, n - held) < classes:
        raise ValueError(
            f"`{name}` must leave at least {classes} images (one per class) on each side of the split, "
            f"but {name}={fraction!r} splits {n} images into {n - held} and {held}."
        )
    return n - held


@lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images.astype(np.float32) / 16.0, data.target.astype(np.int64)


class DigitsTask(Task):
    """Classify scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes).

    Batches are ``(images, labels)``: ``images`` is float32 ``[batch, 1, 8, 8]``, scaled to
    [0, 1] and then standardized with the training split's mean and standard deviation;
    ``labels`` is int64 ``[batch]`` in 0..9.  The split is stratified and fixed by the seed
    (1437 training, 360 validation images with the default ``val_fraction``).
    The model is :meth:`ODEClassifier.for_images`, the loss is cross-entropy and the metric
    is the accuracy, a fraction in [0, 1].

    Args:
        val_fraction: fraction of the images held out for validation, in (0, 1).
        test_fraction: if set, this fraction of all images is first held out as a test
            split (:meth:`test_loader`; stratified, fixed by the seed) and ``val_fraction``
            applies to the rest.  None (default): no test split, the two-way split above.
    """

    name = "digits"
    metric_name = "accuracy"
    higher_is_better = True
    in_channels = 1
    num_classes = 10

    def __init__(self, val_fraction: float = 0.2, test_fraction: float | None = None) -> None:
        self.val_fraction = _check_fraction("val_fraction", val_fraction)
        self.test_fraction = (
            None if test_fraction is None else _check_fraction("test_fraction", test_fraction)
        )
        # Checked now, not deep in scikit-learn when the loaders are made.
        rest = _DIGITS_IMAGES
        if self.test_fraction is not None:
            rest = _check_split("test_fraction", self.test_fraction, rest, self.num_classes)
        _check_split("val_fraction", self.val_fraction, rest, self.num_classes)

    def build_model(
        self,
        width: int = 16,
        n_blocks: int = 1,
        t1: float = 1.0,
        method: str = "dopri5",
        rtol: float = 1e-3,
        atol: float = 1e-3,
        adjoint: bool = True,
        options: dict[str, Any] | None = None,
        pool: int = 4,
    ) -> ODEClassifier:
        """An :class:`ODEClassifier` for 1x8x8 images and 10 classes; see :meth:`ODEClassifier.for_images`."""
        return ODEClassifier.for_images(
            self.in_channels,
            self.num_classes,
            width=width,
            n_blocks=n_blocks,
            pool=pool,
            t1=t1,
            method=method,
            rtol=rtol,
            atol=atol,
            adjoint=adjoint,
            options=options,
        )

    def null_metric(self, *, seed: int = 0) -> float:
        """Chance accuracy, ``1 / num_classes`` (a uniform guess; the classes are balanced)."""
        return 1.0 / self.num_classes

    def arrays(self, *, seed: int = 0) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """The split data as ``((x_train, y_train), (x_val, y_val))`` tensors."""
        if self.test_fraction is not None:
            train, val, _ = self.split(seed=seed)
            return train, val
        from sklearn.model_selection import train_test_split

        seed = _check_seed(seed)
        images, labels = _digits_arrays()
        x_tr, x_va, y_tr, y_va = train_test_split(
            images, labels, test_size=self.val_fraction, random_state=seed, stratify=labels
        )
        mean, std = float(x_tr.mean()), float(x_tr.std())
        x_tr, x_va = ((x - mean) / std for x in (x_tr, x_va))
        return (
            (torch.from_numpy(x_tr[:, None].copy()), torch.from_numpy(y_tr.copy())),
            (torch.from_numpy(x_va[:, None].copy()), torch.from_numpy(y_va.copy())),
        )

    def split(self, *, seed: int = 0) -> tuple[tuple[Tensor, Tensor], ...]:
        """``((x_train, y_train), (x_val, y_val), (x_test, y_test))``, standardized by the training split.

        Raises:
            ValueError: without a ``test_fraction``.
        """
        from sklearn.model_selection import train_test_split

        if self.test_fraction is None:
            raise ValueError(f"Task {self.name!r} has no test split: set `test_fraction` in (0, 1).")
        seed = _check_seed(seed)
        images, labels = _digits_arrays()
        x_rest, x_te, y_rest, y_te = train_test_split(
            images, labels, test_size=self.test_fraction, random_state=seed, stratify=labels
        )
        x_tr, x_va, y_tr, y_va = train_test_split(
            x_rest, y_rest, test_size=self.val_fraction, random_state=seed, stratify=y_rest
        )
        mean, std = float(x_tr.mean()), float(x_tr.std())
        return tuple(
            (torch.from_numpy(((x - mean) / std)[:, None].copy()), torch.from_numpy(y.copy()))
            for x, y in ((x_tr, y_tr), (x_va, y_va), (x_te, y_te))
        )

    def test_loader(self, batch_size: int, *, seed: int = 0) -> DataLoader:
        """An ordered loader of the held-out test split (needs ``test_fraction``)."""
        _, _, test = self.split(seed=seed)
        return DataLoader(TensorDataset(*test), batch_size=integer("batch_size", batch_size))

    def loaders(self, batch_size: int, *, seed: int = 0) -> tuple[DataLoader, DataLoader]:
        """Training and validation loaders of ``(images, labels)``; see :meth:`Task.loaders`."""
        train, val = self.arrays(seed=seed)
        return _make_loaders(train, val, batch_size, seed)

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """Mean cross-entropy of the logits against the labels."""
        x, y = batch[0], batch[1]
        return F.cross_entropy(model(x), y)

    def _evaluate_batch(self, model: nn.Module, batch: Batch) -> tuple[float, float, int]:
        x, y = batch[0], batch[1]
        logits = model(x)
        loss = float(F.cross_entropy(logits, y, reduction="sum"))
        correct = float((logits.argmax(dim=1) == y).sum())
        return loss, correct, int(y.shape[0])

    def __repr__(self) -> str:
        if self.test_fraction is not None:
            return f"DigitsTask(val_fraction={self.val_fraction}, test_fraction={self.test_fraction})"
        return f"DigitsTask(val_fraction={self.val_fraction})"


# --- 2-d densities ---------------------------------------------------------------------------


def _eight_gaussians(rs: np.random.RandomState, n: int) -> np.ndarray:
    angles = rs.randint(0, 8, size=n) * (math.pi / 4)
    centers = 2.0 * math.sqrt(2.0) * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return centers + 0.35 * rs.randn(n, 2)


def _checkerboard(rs: np.random.RandomState, n: int) -> np.ndarray:
    # The 8 "black" unit cells (i + j even) of a 4x4 board on [-2, 2]^2, filled uniformly.
    cells = np.array([(i, j) for i in range(4) for j in range(4) if (i + j) % 2 == 0], dtype=np.float64)
    corner = cells[rs.randint(0, len(cells), size=n)] - 2.0
    return 2.0 * (corner + rs.rand(n, 2))


def _two_moons(rs: np.random.RandomState, n: int) -> np.ndarray:
    from sklearn.datasets import make_moons

    x, _ = make_moons(n_samples=n, noise=0.08, random_state=rs)
    return 2.0 * (x - np.array([0.5, 0.25]))


def _circles(rs: np.random.RandomState, n: int) -> np.ndarray:
    from sklearn.datasets import make_circles

    x, _ = make_circles(n_samples=n, factor=0.5, noise=0.06, random_state=rs)
    return 3.0 * x


def _pinwheel(rs: np.random.RandomState, n: int, arms: int = 5) -> np.ndarray:
    # Gaussian blobs stretched along the radius, each rotated by an angle growing with radius.
    radial = 1.0 + 0.3 * rs.randn(n)
    tangential = 0.08 * rs.randn(n)
    angle = (
        rs.randint(0, arms, size=n) * (2 * math.pi / arms) + 0.6 * np.exp(radial - 1.0) + tangential / radial
    )
    return 2.5 * radial[:, None] * np.stack([np.cos(angle), np.sin(angle)], axis=1)


def _spirals(rs: np.random.RandomState, n: int) -> np.ndarray:
    # Two interleaved Archimedean spirals (the second rotated by pi), uniform in arc length.
    theta = np.sqrt(rs.rand(n)) * 3 * math.pi
    sign = np.where(rs.rand(n) < 0.5, 1.0, -1.0)
    points = sign[:, None] * theta[:, None] * np.stack([np.cos(theta), np.sin(theta)], axis=1)
    return 0.4 * points + 0.15 * rs.randn(n, 2)


_TOY2D = {
    "eight_gaussians": _eight_gaussians,
    "checkerboard": _checkerboard,
    "two_moons": _two_moons,
    "circles": _circles,
    "pinwheel": _pinwheel,
    "spirals": _spirals,
}
#: Data sets of :class:`Toy2DTask`.
TOY2D_DATASETS = tuple(_TOY2D)


def toy2d_sample(dataset: str, n: int, *, seed: int = 0) -> np.ndarray:
    """Draw ``n`` points of a 2-d toy density.

    Args:
        dataset: one of :data:`TOY2D_DATASETS`.
        n: number of points (>= 1).
        seed: seed of the ``numpy.random.RandomState`` used.

    Returns:
        float64 array of shape ``[n, 2]``, roughly within [-4, 4]^2.
    """
    if dataset not in _TOY2D:
        raise ValueError(f"`dataset` must be one of {list(TOY2D_DATASETS)}, but got dataset={dataset!r}.")
    n = integer("n", n)
    return _TOY2D[dataset](np.random.RandomState(_check_seed(seed)), n).astype(np.float64)


class Toy2DTask(Task):
    """Fit a 2-d toy density with a continuous normalizing flow (:class:`CNF`).

    Batches are ``(x,)`` with ``x`` float32 ``[batch, 2]``.  Training and validation points
    are independent draws from one ``numpy.random.RandomState(seed)``.  The loss is the mean
    negative log-likelihood and the metric is the same quantity, in nats (lower is better).

    Args:
        dataset: one of ``"eight_gaussians"``, ``"checkerboard"``, ``"two_moons"``,
            ``"circles"``, ``"pinwheel"``, ``"spirals"``.
        n_train: number of training points (>= 1).
        n_val: number of validation points (>= 1).
    """

    name = "toy2d"
    metric_name = "nll"
    higher_is_better = False

    def __init__(self, dataset: str = "eight_gaussians", n_train: int = 1024, n_val: int = 512) -> None:
        if dataset not in _TOY2D:
            raise ValueError(f"`dataset` must be one of {list(TOY2D_DATASETS)}, but got dataset={dataset!r}.")
        self.dataset = dataset
        self.n_train = integer("n_train", n_train)
        self.n_val = integer("n_val", n_val)

    def build_model(
        self,
        hidden: int = 32,
        depth: int = 2,
        t1: float = 1.0,
        trace: str = "exact",
        method: str = "dopri5",
        rtol: float = 1e-4,
        atol: float = 1e-4,
        adjoint: bool = True,
        activation: str = "tanh",
        options: dict[str, Any] | None = None,
    ) -> CNF:
        """A :class:`CNF` on ``R^2``; the exact trace is the default, as it costs only 2 gradients in 2-d."""
        return CNF(
            2,
            hidden=hidden,
            depth=depth,
            t1=t1,
            trace=trace,
            method=method,
            rtol=rtol,
            atol=atol,
            adjoint=adjoint,
            activation=activation,
            options=options,
        )

    def loaders(self, batch_size: int, *, seed: int = 0) -> tuple[DataLoader, DataLoader]:
        """Training and validation loaders of ``(x,)``; see :meth:`Task.loaders`."""
        points = toy2d_sample(self.dataset, self.n_train + self.n_val, seed=seed)
        x = torch.from_numpy(points.astype(np.float32))
        return _make_loaders((x[: self.n_train],), (x[self.n_train :],), batch_size, _check_seed(seed))

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """Mean negative log-likelihood in nats."""
        return -model(batch[0]).mean()

    def null_metric(self, *, seed: int = 0) -> float:
        """The NLL of the validation points under the flow's standard normal base (an identity flow)."""
        x = self._val_tensors(seed)[0].double()
        return float((0.5 * (x**2).sum(1) + 0.5 * x.shape[1] * math.log(2 * math.pi)).mean())

    def __repr__(self) -> str:
        return f"Toy2DTask(dataset={self.dataset!r}, n_train={self.n_train}, n_val={self.n_val})"


# --- irregular time series -------------------------------------------------------------------


class TimeSeriesTask(Task):
    """Forecast irregularly sampled, partially observed damped oscillations with an :class:`ODERNN`.

    Each series is ``x(t) = a * exp(-g t) * cos(w t + p)`` with random amplitude
    ``a in [0.5, 1.5]``, damping ``g in [0, 0.15]``, angular frequency ``w in [1, 3]`` and
    phase ``p``.  It is observed, with Gaussian noise of standard deviation ``noise``, at
    ``k`` random sorted times in ``[0, window]`` (``k`` uniform in
    ``[min_points, n_points]``); each observation after the first is then dropped (masked)
    with probability ``drop``.  The target is the noise-free value at a random time in
    ``[window, window + 1]``.

    Batches are ``(times, values, mask, until, target)``: ``times`` float32
    ``[batch, n_points]`` (non-decreasing; shorter series repeat their last time),
    ``values`` and ``mask`` float32 ``[batch, n_points, 1]`` (padded or dropped entries have
    value 0 and mask 0), ``until`` float32 ``[batch]`` (the forecast time) and ``target``
    float32 ``[batch, 1]``.  The loss and the metric are the mean squared error.

    Args:
        n_train: number of training series (>= 1).
        n_val: number of validation series (>= 1).
        n_points: maximum observations per series (>= 1).
        min_points: minimum observations per series, in [1, n_points].
        window: length of the observation window (> 0).
        noise: observation noise standard deviation (>= 0).
        drop: probability of masking an observation, in [0, 1).
    """

    name = "timeseries"
    metric_name = "mse"
    higher_is_better = False
    input_dim = 1
    output_dim = 1

    def __init__(
        self,
        n_train: int = 512,
        n_val: int = 256,
        n_points: int = 10,
        min_points: int = 6,
        window: float = 4.0,
        noise: float = 0.05,
        drop: float = 0.2,
        lead: float = 0.5,
    ) -> None:
        self.n_train = integer("n_train", n_train)
        self.n_val = integer("n_val", n_val)
        self.n_points = integer("n_points", n_points)
        self.min_points = integer("min_points", min_points)
        if self.min_points > self.n_points:
            raise ValueError(
                f"`min_points <= n_points` must hold, but got min_points={min_points}, n_points={n_points}."
            )
        if isinstance(window, bool) or not isinstance(window, (int, float)) or not 0 < window < math.inf:
            raise ValueError(f"`window` must be a positive finite number, but got window={window!r}.")
        if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0 <= noise < math.inf:
            raise ValueError(f"`noise` must be a finite number >= 0, but got noise={noise!r}.")
        if isinstance(drop, bool) or not isinstance(drop, (int, float)) or not 0 <= drop < 1:
            raise ValueError(f"`drop` must be a number in [0, 1), but got drop={drop!r}.")
        self.window = float(window)
        self.noise = float(noise)
        if isinstance(lead, bool) or not isinstance(lead, (int, float)) or not 0 <= lead < math.inf:
            raise ValueError(f"`lead` must be a finite number >= 0, but got lead={lead!r}.")
        self.drop = float(drop)
        self.lead = float(lead)

    def build_model(
        self,
        hidden_dim: int = 32,
        hidden: int | None = None,
        depth: int = 2,
        activation: str = "tanh",
        t1: float = 1.0,
        method: str = "dopri5",
        rtol: float = 1e-3,
        atol: float = 1e-3,
        adjoint: bool = True,
        options: dict[str, Any] | None = None,
    ) -> ODERNN:
        """An :class:`ODERNN` with one input and one output channel; ``t1`` is its time scale ``T``."""
        return ODERNN(
            self.input_dim,
            hidden_dim,
            self.output_dim,
            hidden=hidden,
            depth=depth,
            activation=activation,
            t1=t1,
            method=method,
            rtol=rtol,
            atol=atol,
            adjoint=adjoint,
            options=options,
        )

    def generate(self, n: int, rs: np.random.RandomState) -> tuple[Tensor, ...]:
        """Draw ``n`` series as the tensors of one batch (see the class docstring)."""
        n = integer("n", n)
        length = self.n_points
        amp = rs.uniform(0.5, 1.5, n)
        damp = rs.uniform(0.0, 0.15, n)
        freq = rs.uniform(0.5, 1.5, n)
        phase = rs.uniform(0.0, 2 * math.pi, n)

        def signal(t: np.ndarray) -> np.ndarray:
            a, g, w, p = (v.reshape(-1, *([1] * (t.ndim - 1))) for v in (amp, damp, freq, phase))
            return a * np.exp(-g * t) * np.cos(w * t + p)

        counts = rs.randint(self.min_points, length + 1, size=n)
        times = np.sort(rs.uniform(0.0, self.window, (n, length)), axis=1)
        present = np.arange(length)[None, :] < counts[:, None]
        # Padded positions repeat the last real time: zero gap, so the ODE leaves h alone.
        last = times[np.arange(n), counts - 1]
        times = np.where(present, times, last[:, None])
        keep = rs.rand(n, length) >= self.drop
        keep[:, 0] = True
        mask = present & keep
        values = np.where(mask, signal(times) + self.noise * rs.randn(n, length), 0.0)
        until = rs.uniform(self.window, self.window + self.lead, n)
        target = signal(until)[:, None]
        as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
        return (
            as_tensor(times),
            as_tensor(values[..., None]),
            as_tensor(mask[..., None]),
            as_tensor(until),
            as_tensor(target),
        )

    def loaders(self, batch_size: int, *, seed: int = 0) -> tuple[DataLoader, DataLoader]:
        """Loaders of ``(times, values, mask, until, target)`` batches; see :meth:`Task.loaders`."""
        seed = _check_seed(seed)
        rs = np.random.RandomState(seed)
        train = self.generate(self.n_train, rs)
        val = self.generate(self.n_val, rs)
        return _make_loaders(train, val, batch_size, seed)

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """Mean squared error of the forecast."""
        times, values, mask, until, target = batch
        return F.mse_loss(model(times, values, mask, until=until), target)

    def null_metric(self, *, seed: int = 0) -> float:
        """The MSE of the best constant forecast: the variance of the validation targets."""
        target = self._val_tensors(seed)[4].double()
        return float(((target - target.mean()) ** 2).mean())

    def __repr__(self) -> str:
        return (
            f"TimeSeriesTask(n_train={self.n_train}, n_val={self.n_val}, n_points={self.n_points}, "
            f"min_points={self.min_points}, window={self.window}, noise={self.noise}, drop={self.drop})"
        )


class MultiBlockTask(DigitsTask):
    """Digits with a three-block model whose blocks have different roles, and a test split.

    The data are those of :class:`DigitsTask` (8x8 digits, accuracy), split three ways and
    stratified by the seed: ``test_fraction`` of the images is held out for
    :meth:`test_loader` (never seen by training or search), ``val_fraction`` of the rest
    validates.  The model is :class:`MultiBlockClassifier`: a convolutional block at full
    resolution, one after pooling and a vector block in the classifier's feature space, so
    the horizons the blocks need differ.

    Args:
        val_fraction: fraction of the non-test images used for validation, in (0, 1).
        test_fraction: fraction of all images held out as the test split, in (0, 1).
    """

    name = "multiblock"

    def __init__(self, val_fraction: float = 0.2, test_fraction: float = 0.2) -> None:
        super().__init__(val_fraction, test_fraction)

    def build_model(  # type: ignore[override]
        self,
        width: int = 8,
        t1: float = 1.0,
        method: str = "dopri5",
        rtol: float = 1e-3,
        atol: float = 1e-3,
        adjoint: bool = True,
        options: dict[str, Any] | None = None,
    ) -> MultiBlockClassifier:
        """A :class:`MultiBlockClassifier` for 1x8x8 images and 10 classes."""
        return MultiBlockClassifier(
            self.in_channels,
            self.num_classes,
            width=width,
            t1=t1,
            method=method,
            rtol=rtol,
            atol=atol,
            adjoint=adjoint,
            options=options,
        )

    def __repr__(self) -> str:
        return f"MultiBlockTask(val_fraction={self.val_fraction}, test_fraction={self.test_fraction})"


def test_loader(task: Task, batch_size: int, *, seed: int = 0) -> DataLoader:
    """The held-out test split of ``task`` (data no training or search saw).

    ``multiblock`` has one built in, ``digits`` one with ``test_fraction`` set;
    ``timeseries`` draws fresh series after the training and validation ones (same seed).

    Raises:
        ValueError: for a task without a test split.
    """
    own = getattr(task, "test_loader", None)
    if callable(own):
        return own(batch_size, seed=seed)
    if isinstance(task, TimeSeriesTask):
        rs = np.random.RandomState(_check_seed(seed))
        task.generate(task.n_train, rs)
        task.generate(task.n_val, rs)
        test = task.generate(task.n_val, rs)
        return DataLoader(TensorDataset(*test), batch_size=integer("batch_size", batch_size))
    raise ValueError(
        f"Task {task.name!r} has no test split; `multiblock`, `timeseries` and `digits` with "
        "`test_fraction` have one."
    )


_TASK_CLASSES: dict[str, type[Task]] = {
    "digits": DigitsTask,
    "toy2d": Toy2DTask,
    "timeseries": TimeSeriesTask,
    "multiblock": MultiBlockTask,
}


def get_task(name: str, **kwargs: Any) -> Task:
    """The task called ``name``, built with ``kwargs``.

    Args:
        name: one of :data:`TASKS` (``"digits"``, ``"toy2d"``, ``"timeseries"``).
        **kwargs: arguments of the task's constructor.

    Returns:
        A :class:`Task`.
    """
    if name not in _TASK_CLASSES:
        raise ValueError(f"`name` must be one of {list(TASKS)}, but got name={name!r}.")
    return _TASK_CLASSES[name](**kwargs)
