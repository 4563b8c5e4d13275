"""The training loop: history, exact resume, Ctrl-C, non-finite loss, bad input."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from snopt._ode import ODEBlock
from snopt._training import (
    SOLVE_CHECK_EVERY,
    Callback,
    NonFiniteLossError,
    Status,
    StopTraining,
    TrainingError,
    fit,
)


class Field(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(3, 8)
        self.l2 = nn.Linear(8, 3)

    def forward(self, t, x):
        return self.l2(torch.tanh(self.l1(x)))


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 3),
        ODEBlock(Field(), 0.0, 0.5, method="rk4", options={"step_size": 0.25}),
        nn.Linear(3, 2),
    )


def make_loaders(seed=0):
    g = torch.Generator().manual_seed(123)
    x = torch.randn(96, 4, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    train = DataLoader(
        TensorDataset(x[:64], y[:64]),
        batch_size=16,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    val = DataLoader(TensorDataset(x[64:], y[64:]), batch_size=32)
    return train, val


def accuracy(out, y):
    return (out.argmax(1) == y).float().mean()


def run(max_steps=None, epochs=None, checkpoint=None, resume=False, callbacks=(), eval_every=None):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train, val = make_loaders()
    result = fit(
        model,
        train,
        val,
        optimizer=opt,
        loss_fn=nn.functional.cross_entropy,
        metric_fn=accuracy,
        max_steps=max_steps,
        epochs=epochs,
        checkpoint=checkpoint,
        resume=resume,
        callbacks=callbacks,
        eval_every=eval_every,
        seed=7,
        progress=False,
    )
    return model, result


def test_history_records_every_step_and_evaluations():
    _, result = run(epochs=2)
    assert result.status == "completed"
    assert [r["step"] for r in result.history] == list(range(1, 9))
    evals = [r for r in result.history if "val_loss" in r]
    assert [r["step"] for r in evals] == [4, 8]  # end of each epoch
    rec = result.history[-1]
    for key in ("epoch", "wall_time", "train_loss", "lr", "nfe_forward", "nfe_backward", "nfe_total", "t1/1"):
        assert key in rec
    # rk4, 2 steps each way, and one evaluation for dL/dt1 in the backward pass.
    assert rec["nfe_forward"] == 8 and rec["nfe_backward"] == 9
    assert rec["nfe_total"] == 8 * 17
    assert result.stats["steps"] == 8 and result.stats["nfe_total"] == 136
    assert 0.0 <= result.final["metric"] <= 1.0 and result.final["t1/1"] == 0.5
    assert result.history[-1]["wall_time"] == pytest.approx(result.stats["wall_time"])


def test_resume_mid_epoch_reproduces_an_uninterrupted_run(tmp_path):
    model_a, full = run(max_steps=10)
    ckpt = tmp_path / "run.pt"
    run(max_steps=6, checkpoint=ckpt)
    model_b, resumed = run(max_steps=10, checkpoint=ckpt, resume=True)
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in full.history]
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(pa, pb)
    assert resumed.final["metric"] == full.final["metric"]


class Interrupt(Callback):
    def __init__(self, at):
        self.at = at

    def on_step_end(self, trainer, record):
        if trainer.step == self.at:
            raise KeyboardInterrupt


def test_ctrl_c_saves_a_checkpoint_and_resume_is_exact(tmp_path):
    ckpt = tmp_path / "c.pt"
    with pytest.warns(UserWarning, match="Interrupted at step 3"):
        _, stopped = run(epochs=2, checkpoint=ckpt, callbacks=[Interrupt(3)])
    assert stopped.status == "interrupted" and ckpt.exists() and len(stopped.history) == 3
    _, resumed = run(epochs=2, checkpoint=ckpt, resume=True)
    _, full = run(epochs=2)
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in full.history]


def test_ctrl_c_without_a_checkpoint_path_saves_in_the_working_dir(tmp_path):
    with pytest.warns(UserWarning, match="snopt-interrupted.pt"):
        _, stopped = run(epochs=1, callbacks=[Interrupt(1)])
    assert (tmp_path / "snopt-interrupted.pt").exists()


def test_non_finite_loss_names_the_step():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train, _ = make_loaders()
    calls = {"n": 0}

    def loss_fn(out, y):
        calls["n"] += 1
        loss = nn.functional.cross_entropy(out, y)
        return loss * float("nan") if calls["n"] == 3 else loss

    with pytest.raises(NonFiniteLossError, match=r"became nan at step 3 \(epoch 1\).*learning rate") as info:
        fit(model, train, optimizer=opt, loss_fn=loss_fn, epochs=1, progress=False)
    assert info.value.result.status == "failed" and len(info.value.result.history) == 2


def test_solver_failure_becomes_a_training_error():
    model = make_model()
    model[1] = ODEBlock(Field(), 0.0, 50.0, rtol=1e-12, atol=1e-12, options={"max_num_steps": 2})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train, _ = make_loaders()
    with pytest.raises(TrainingError, match="max_num_steps") as info:
        fit(model, train, optimizer=opt, loss_fn=nn.functional.cross_entropy, epochs=1, progress=False)
    assert info.value.result.status == "failed"


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(), "One of `epochs` or `max_steps` must be given"),
        (dict(epochs=0), r"`epochs` must be a positive integer, but got epochs=0"),
        (dict(max_steps=-1), r"`max_steps` must be a positive integer"),
        (dict(epochs=1, eval_every=0), r"`eval_every` must be a positive integer"),
        (dict(epochs=1, max_grad_norm=-1.0), r"`max_grad_norm` must be a positive number"),
        (dict(epochs=1, resume=True), r"`resume=True` needs a `checkpoint` path"),
    ],
)
def test_bad_arguments(kwargs, match):
    model = make_model()
    train, _ = make_loaders()
    with pytest.raises(ValueError, match=match):
        fit(
            model,
            train,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            loss_fn=nn.functional.cross_entropy,
            progress=False,
            **kwargs,
        )


def test_scheduler_and_clipping_are_applied():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    train, _ = make_loaders()
    result = fit(
        model,
        train,
        optimizer=opt,
        scheduler=sched,
        loss_fn=nn.functional.cross_entropy,
        epochs=1,
        max_grad_norm=0.5,
        progress=False,
    )
    assert [r["lr"] for r in result.history] == [0.1, 0.1, 0.05, 0.05]


@pytest.mark.parametrize("max_norm", [None, 1e-3])
def test_gradient_clipping_bounds_the_step(max_norm):
    """One SGD step of lr 1 moves the parameters by exactly the clipped gradient norm."""
    model = make_model()
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    train, _ = make_loaders()
    first = [next(iter(train))]
    probe = make_model()  # the unclipped gradient norm of that batch, computed by hand
    nn.functional.cross_entropy(probe(first[0][0]), first[0][1]).backward()
    raw = torch.cat([p.grad.flatten() for p in probe.parameters()]).norm()
    fit(
        model,
        first,
        optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        loss_fn=nn.functional.cross_entropy,
        max_steps=1,
        max_grad_norm=max_norm,
        progress=False,
    )
    moved = (torch.cat([p.detach().flatten() for p in model.parameters()]) - before).norm()
    assert raw > 1e-2  # so that clipping to 1e-3 binds
    expected = raw if max_norm is None else torch.tensor(max_norm)
    torch.testing.assert_close(moved, expected.to(moved.dtype), rtol=1e-4, atol=1e-7)


def test_nfe_of_a_block_called_twice_per_step_counts_every_call():
    calls = []

    class Counting(Field):
        def forward(self, t, x):
            calls.append(torch.is_grad_enabled())
            return super().forward(t, x)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(4, 3)
            self.block = ODEBlock(Counting(), 0.0, 0.5, method="dopri5", rtol=1e-5, atol=1e-6)
            self.out = nn.Linear(3, 2)

        def forward(self, x):
            return self.out(self.block(self.block(self.inp(x))))

    torch.manual_seed(0)
    model = Twice()
    train, _ = make_loaders()
    seen = []

    class Count(Callback):
        def on_step_end(self, trainer, record):
            seen.append((len(calls), record))

    result = fit(
        model,
        train,
        None,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        loss_fn=nn.functional.cross_entropy,
        max_steps=3,
        callbacks=[Count()],
        seed=7,
        progress=False,
    )
    previous = 0
    for total_calls, record in seen:
        assert record["nfe_forward"] + record["nfe_backward"] == total_calls - previous
        assert record["nfe_forward"] > model.block.stats.nfe_forward  # two calls, not the last one only
        previous = total_calls
    assert result.stats["nfe_forward"] + result.stats["nfe_backward"] == len(calls)


class _NFEBudget(Callback):
    """Stops training where the run's NFE reaches ``limit``, checked inside the solves too."""

    def __init__(self, limit):
        self.limit = limit

    def on_solve(self, trainer):
        if trainer.nfe_so_far >= self.limit:
            raise StopTraining(Status.BUDGET, f"NFE {trainer.nfe_so_far} >= {self.limit}")


def _long_solve_model(**block_kwargs):
    """A model whose every solve takes 4 x 500 field evaluations (rk4, 500 steps)."""
    model = make_model()
    model[1] = ODEBlock(Field(), 0.0, 0.5, method="rk4", options={"step_size": 0.001}, **block_kwargs)
    return model


@pytest.mark.parametrize("limit", [100, 2100])  # in the first forward solve; in its adjoint solve
def test_an_nfe_budget_stops_training_inside_the_solve(limit):
    model = _long_solve_model()
    train, _ = make_loaders()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    result = fit(
        model,
        train,
        optimizer=opt,
        loss_fn=nn.functional.cross_entropy,
        epochs=1,
        callbacks=[_NFEBudget(limit)],
        progress=False,
    )
    assert result.status == "budget" and result.history == []  # the first step never finished
    assert "NFE" in result.message
    # Stopped within one check interval (plus the dL/dt1 evaluation) of the limit, not after
    # the step's 4000 evaluations; the partial step's evaluations are counted.
    assert limit <= result.stats["nfe_total"] <= limit + SOLVE_CHECK_EVERY + 1
    assert (result.stats["nfe_backward"] > 0) == (limit > 2000)


def test_a_solve_over_max_nfe_fails_the_run_with_the_cap_in_the_message():
    model = _long_solve_model(max_nfe=300)
    train, _ = make_loaders()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TrainingError, match=r"forward solve took more than max_nfe=300") as info:
        fit(model, train, optimizer=opt, loss_fn=nn.functional.cross_entropy, epochs=1, progress=False)
    result = info.value.result
    assert result.status == "failed" and result.stats["nfe_total"] == 301


def test_fit_takes_the_arguments_of_trainer():
    import inspect

    from snopt import Trainer, fit

    assert inspect.signature(fit).parameters == inspect.signature(Trainer).parameters
    model = nn.Linear(2, 2)
    with pytest.raises(TypeError, match="'epoch'"):  # a misspelled argument, as Trainer names it
        fit(model, [], optimizer=torch.optim.SGD(model.parameters(), lr=0.1), epoch=1)
