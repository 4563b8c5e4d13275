"""Tests of the tasks: data shapes, determinism, losses, evaluation and a short training run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from snopt._models import CNF, ODERNN, ODEClassifier
from snopt._tasks import (
    TASKS,
    TOY2D_DATASETS,
    DigitsTask,
    Task,
    TimeSeriesTask,
    Toy2DTask,
    get_task,
    toy2d_sample,
)

SMALL_TIMESERIES = dict(n_train=40, n_val=24, n_points=7, min_points=3)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _batches(loader) -> list[tuple[torch.Tensor, ...]]:
    return [tuple(t.clone() for t in batch) for batch in loader]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(
        all(torch.equal(x, y) for x, y in zip(batch_a, batch_b)) for batch_a, batch_b in zip(a, b)
    )


def test_registry() -> None:
    assert TASKS == ("digits", "toy2d", "timeseries", "multiblock")
    assert isinstance(get_task("digits"), DigitsTask)
    assert isinstance(get_task("toy2d", dataset="checkerboard"), Toy2DTask)
    assert isinstance(get_task("timeseries", n_train=8), TimeSeriesTask)
    with pytest.raises(
        ValueError, match=r"`name` must be one of \['digits', 'toy2d', 'timeseries', 'multiblock'\]"
    ):
        get_task("mnist")
    with pytest.raises(TypeError):
        Task()  # abstract


def test_task_attributes() -> None:
    expected = {
        "digits": ("accuracy", True),
        "toy2d": ("nll", False),
        "timeseries": ("mse", False),
        "multiblock": ("accuracy", True),
    }
    for name in TASKS:
        task = get_task(name)
        assert task.name == name
        assert (task.metric_name, task.higher_is_better) == expected[name]


def test_digits_shapes_and_normalization() -> None:
    train, val = DigitsTask().loaders(64, seed=0)
    x, y = next(iter(train))
    assert x.shape == (64, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (64,) and y.dtype == torch.int64
    assert len(train.dataset) == 1437 and len(val.dataset) == 360
    x_all = train.dataset.tensors[0]
    assert abs(float(x_all.mean())) < 1e-4 and abs(float(x_all.std()) - 1) < 1e-3
    assert set(val.dataset.tensors[1].tolist()) == set(range(10))


def test_toy2d_shapes() -> None:
    task = Toy2DTask("two_moons", n_train=100, n_val=30)
    train, val = task.loaders(32, seed=0)
    (x,) = next(iter(train))
    assert x.shape == (32, 2) and x.dtype == torch.float32
    assert len(train.dataset) == 100 and len(val.dataset) == 30


@pytest.mark.parametrize("dataset", TOY2D_DATASETS)
def test_toy2d_generators(dataset: str) -> None:
    points = toy2d_sample(dataset, 500, seed=3)
    assert points.shape == (500, 2) and np.isfinite(points).all()
    assert np.abs(points).max() < 8 and points.std(0).min() > 0.5
    np.testing.assert_array_equal(points, toy2d_sample(dataset, 500, seed=3))
    assert not np.array_equal(points, toy2d_sample(dataset, 500, seed=4))


def test_timeseries_shapes_and_padding() -> None:
    task = TimeSeriesTask(**SMALL_TIMESERIES)
    train, val = task.loaders(16, seed=0)
    times, values, mask, until, target = next(iter(train))
    assert times.shape == (16, 7) and values.shape == mask.shape == (16, 7, 1)
    assert until.shape == (16,) and target.shape == (16, 1)
    assert all(t.dtype == torch.float32 for t in (times, values, mask, until, target))
    assert bool((times[:, 1:] >= times[:, :-1]).all())
    assert bool((until >= times[:, -1]).all())
    assert bool((mask[:, 0] == 1).all()) and bool((values[mask == 0] == 0).all())
    assert len(val.dataset) == 24


@pytest.mark.parametrize(
    "task", [DigitsTask(), Toy2DTask(n_train=64, n_val=16), TimeSeriesTask(**SMALL_TIMESERIES)], ids=repr
)
def test_loaders_are_deterministic_for_a_seed(task: Task) -> None:
    a_train, a_val = task.loaders(16, seed=5)
    b_train, b_val = task.loaders(16, seed=5)
    first = _batches(a_train)
    assert _same(first, _batches(b_train))
    assert _same(_batches(a_val), _batches(b_val))
    c_train, _ = task.loaders(16, seed=6)
    assert not _same(first, _batches(c_train))
    # A second epoch reshuffles, the same way for both loaders.
    second = _batches(a_train)
    assert not _same(first, second)
    assert _same(second, _batches(b_train))


def test_models_and_losses() -> None:
    cases = [
        (DigitsTask(), dict(width=4), ODEClassifier),
        (Toy2DTask(n_train=32, n_val=8), dict(hidden=8), CNF),
        (TimeSeriesTask(**SMALL_TIMESERIES), dict(hidden_dim=8), ODERNN),
    ]
    for task, hparams, cls in cases:
        model = task.build_model(**hparams)
        assert isinstance(model, cls) and len(model.blocks) == 1
        batch = next(iter(task.loaders(8)[0]))
        loss = task.loss(model, batch)
        assert loss.shape == () and torch.isfinite(loss)
        loss.backward()
        assert all(p.grad is not None for p in model.parameters())


def test_evaluate_restores_mode_and_matches_a_direct_computation() -> None:
    task = DigitsTask()
    # Two fixed RK4 steps: the solver is not what is tested (the default dopri5 costs 4x more).
    model = task.build_model(width=4, method="rk4", options={"step_size": 0.5}).double()
    _, val = task.loaders(100, seed=0)
    model.train()
    result = task.evaluate(model, val)  # float32 batches are cast to the model's float64
    assert model.training and set(result) == {"val_loss", "metric"}
    x, y = (t for t in val.dataset.tensors)
    with torch.no_grad():
        model.eval()
        logits = model(x.double())
    assert result["metric"] == pytest.approx(float((logits.argmax(1) == y).double().mean()))
    assert result["val_loss"] == pytest.approx(float(nn.functional.cross_entropy(logits, y)), rel=1e-6)
    task.evaluate(model, val)
    assert not model.training


def test_evaluate_metric_equals_loss_for_density_and_regression() -> None:
    for task, hparams in (
        (Toy2DTask(n_train=16, n_val=16), dict(hidden=4)),
        (TimeSeriesTask(**SMALL_TIMESERIES), {}),
    ):
        model = task.build_model(**hparams)
        _, val = task.loaders(100)
        result = task.evaluate(model, val)
        assert result["metric"] == pytest.approx(result["val_loss"])
        with torch.no_grad():
            assert result["val_loss"] == pytest.approx(float(task.loss(model, next(iter(val)))), rel=1e-5)


def test_batch_to() -> None:
    batch = [torch.zeros(2, 3), torch.zeros(2, dtype=torch.int64)]
    moved = Task.batch_to(batch, "cpu", dtype=torch.float64)
    assert isinstance(moved, tuple)
    assert moved[0].dtype == torch.float64 and moved[1].dtype == torch.int64
    assert Task.batch_to(batch, torch.device("cpu"))[0].dtype == torch.float32
    with pytest.raises(TypeError, match="`batch` must be a tuple or list"):
        Task.batch_to(torch.zeros(2), "cpu")


def test_one_epoch_of_adam_on_digits() -> None:
    torch.manual_seed(0)
    task = get_task("digits")
    # Width 8 and fixed-step RK4 (2 steps on [0, 1]): an eighth of the default model's cost;
    # it reaches 0.90 (the default model 0.96).
    model = task.build_model(width=8, method="rk4", options={"step_size": 0.5})
    train, val = task.loaders(64, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for batch in train:
        optimizer.zero_grad()
        for block in model.blocks:
            block.zero_t1_grad()
        task.loss(model, batch).backward()
        optimizer.step()
    assert task.evaluate(model, val)["metric"] > 0.8


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (
            lambda: DigitsTask(val_fraction=1.0),
            r"`val_fraction` must be a number in \(0, 1\), but got val_fraction=1.0",
        ),
        (lambda: DigitsTask().loaders(0), "`batch_size` must be a positive integer, but got batch_size=0"),
        (lambda: DigitsTask().loaders(8, seed=-1), r"`seed` must be an integer >= 0, but got seed=-1"),
        (lambda: Toy2DTask("swiss_roll"), r"`dataset` must be one of \['eight_gaussians'"),
        (lambda: Toy2DTask(n_train=0), "`n_train` must be a positive integer"),
        (lambda: Toy2DTask(n_val=1.5), "`n_val` must be a positive integer"),
        (lambda: toy2d_sample("circles", 0), "`n` must be a positive integer"),
        (lambda: TimeSeriesTask(n_points=0), "`n_points` must be a positive integer"),
        (lambda: TimeSeriesTask(n_points=4, min_points=5), r"`min_points <= n_points` must hold"),
        (lambda: TimeSeriesTask(window=0), "`window` must be a positive finite number"),
        (lambda: TimeSeriesTask(noise=-0.1), r"`noise` must be a finite number >= 0"),
        (lambda: TimeSeriesTask(drop=1.0), r"`drop` must be a number in \[0, 1\)"),
        (lambda: TimeSeriesTask(lead=float("nan")), r"`lead` must be a finite number >= 0"),
        (lambda: DigitsTask().build_model(width=0), "`width` must be a positive integer"),
    ],
)
def test_invalid_arguments(build, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build()


def test_multiblock_task_has_three_blocks_and_a_disjoint_test_split():
    import torch

    from snopt import ode_blocks
    from snopt._tasks import get_task, test_loader

    task = get_task("multiblock")
    model = task.build_model(width=4, method="rk4", options={"step_size": 0.5})
    assert [n for n, _ in ode_blocks(model)] == ["blocks.0", "blocks.1", "blocks.2"]
    train, val = task.loaders(64, seed=1)
    test = test_loader(task, 64, seed=1)
    sizes = [len(loader.dataset) for loader in (train, val, test)]
    assert sum(sizes) == 1797 and sizes[2] == pytest.approx(0.2 * 1797, abs=1)
    # no test image is a training or validation image (standardisation is shared, so compare exactly)
    seen = {tuple(x.flatten().tolist()) for loader in (train, val) for x in loader.dataset.tensors[0]}
    dup = sum(tuple(x.flatten().tolist()) in seen for x in test.dataset.tensors[0])
    assert dup <= 5  # the digits set itself holds a few identical images
    x, y = next(iter(test))
    assert model(x).shape == (x.shape[0], 10) and y.dtype == torch.int64


def test_timeseries_test_split_is_fresh_series():
    from snopt._tasks import get_task, test_loader

    task = get_task("timeseries", n_train=8, n_val=4)
    _, val = task.loaders(4, seed=0)
    test = test_loader(task, 4, seed=0)
    assert len(test.dataset) == 4
    assert not (test.dataset.tensors[4] == val.dataset.tensors[4]).all()
    with pytest.raises(ValueError, match="has no test split"):
        test_loader(get_task("toy2d"), 4)


def test_digits_split_sizes_are_checked_as_scikit_learn_splits() -> None:
    from snopt._tasks import _DIGITS_IMAGES, _digits_arrays

    assert len(_digits_arrays()[0]) == _DIGITS_IMAGES
    # 0.0051 holds out ceil(9.16) = 10 images, one per class: scikit-learn splits it.
    DigitsTask(val_fraction=0.0051).arrays()
    DigitsTask(val_fraction=0.994).arrays()
    for fraction in (0.005, 0.995):  # 9 images held out, or 9 left: refused before scikit-learn is asked
        with pytest.raises(
            ValueError, match=rf"`val_fraction` must leave at least 10 images .* val_fraction={fraction} "
        ):
            DigitsTask(val_fraction=fraction)
    with pytest.raises(ValueError, match="`test_fraction` must leave"):
        DigitsTask(test_fraction=0.995)
    with pytest.raises(ValueError, match="`val_fraction` must leave .* splits 179 images"):
        DigitsTask(val_fraction=0.96, test_fraction=0.9)


def test_null_metric_is_what_a_model_that_learned_nothing_scores() -> None:
    """The reference of the Pareto hypervolumes, checked by scoring input-blind models."""
    digits = DigitsTask()
    _, val = digits.loaders(100, seed=1)

    class Constant(nn.Module):
        def __init__(self, out: torch.Tensor) -> None:
            super().__init__()
            self.out = out

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            return self.out.expand(x.shape[0], -1)

    # The ten constant guesses score the class frequencies; their mean is chance accuracy.
    scores = [digits.evaluate(Constant(torch.eye(10)[k : k + 1]), val)["metric"] for k in range(10)]
    assert digits.null_metric(seed=1) == pytest.approx(float(np.mean(scores)), rel=1e-12)
    assert get_task("multiblock").null_metric() == 0.1

    series = TimeSeriesTask(**SMALL_TIMESERIES)
    _, val = series.loaders(5, seed=3)
    mean = torch.cat([b[4] for b in val]).double().mean()  # the best constant forecast
    best_constant = series.evaluate(Constant(mean.reshape(1, 1)), val)["metric"]
    assert series.null_metric(seed=3) == pytest.approx(best_constant, rel=1e-6)

    toy = Toy2DTask(n_train=16, n_val=40)
    flow = toy.build_model(hidden=4)
    for p in flow.parameters():  # a zero field: the identity flow onto the standard normal base
        nn.init.zeros_(p)
    _, val = toy.loaders(16, seed=2)
    assert toy.null_metric(seed=2) == pytest.approx(toy.evaluate(flow, val)["metric"], rel=1e-6)
