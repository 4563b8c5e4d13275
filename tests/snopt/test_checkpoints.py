"""Checkpoints: data only (a crafted file never runs), clear errors, and exact resume anywhere."""

import os
import pickle
import re
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from snopt._checkpoint import CheckpointError, read_checkpoint
from snopt._ode import ODEBlock
from snopt._training import Callback, TrainingError, fit


class Field(nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.l1 = nn.Linear(3, width)
        self.l2 = nn.Linear(width, 3)

    def forward(self, t, x):
        return self.l2(torch.tanh(self.l1(x)))


def make_model(width=8):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 3),
        ODEBlock(Field(width), 0.0, 0.5, method="rk4", options={"step_size": 0.25}),
        nn.Linear(3, 2),
    ).double()


def make_loaders():
    g = torch.Generator().manual_seed(123)
    x = torch.randn(96, 4, generator=g, dtype=torch.float64)
    y = (x[:, 0] + x[:, 1] > 0).long()
    # 4 shuffled batches per epoch, the order drawn from the loader's own generator.
    train = DataLoader(
        TensorDataset(x[:64], y[:64]), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(5)
    )
    return train, DataLoader(TensorDataset(x[64:], y[64:]), batch_size=32)


class Crash(Callback):
    """Dies at a step without saving anything, like ``kill -9``."""

    def __init__(self, at):
        self.at = at

    def on_step_end(self, trainer, record):
        if trainer.step == self.at:
            raise RuntimeError("killed")


def train(epochs=3, checkpoint=None, resume=False, checkpoint_every=None, callbacks=(), width=8, opt="sgd"):
    model = make_model(width)
    if opt == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    train_loader, val_loader = make_loaders()
    return fit(
        model,
        train_loader,
        val_loader,
        optimizer=optimizer,
        loss_fn=nn.functional.cross_entropy,
        epochs=epochs,
        checkpoint=checkpoint,
        checkpoint_every=checkpoint_every,
        resume=resume,
        callbacks=callbacks,
        seed=3,
        progress=False,
    )


def losses(result):
    return {r["step"]: r["train_loss"] for r in result.history}


@pytest.mark.parametrize(
    ("crash_at", "checkpoint_every", "resumed_from"),
    [(6, None, 4), (7, 3, 6), (9, 2, 8)],
    ids=["epoch-end", "mid-epoch", "epoch-end-by-steps"],
)
def test_resume_after_a_kill_repeats_every_later_loss_exactly(
    tmp_path, crash_at, checkpoint_every, resumed_from
):
    straight = losses(train())
    ckpt = tmp_path / "run.pt"
    with pytest.raises(RuntimeError, match="killed"):
        train(checkpoint=ckpt, checkpoint_every=checkpoint_every, callbacks=[Crash(crash_at)])
    state = torch.load(ckpt, weights_only=True)
    assert state["step"] == resumed_from
    resumed = train(checkpoint=ckpt, checkpoint_every=checkpoint_every, resume=True)
    again = losses(resumed)
    later = [s for s in straight if s > resumed_from]
    assert later == list(range(resumed_from + 1, 13))
    # Exact equality (float64, CPU): the data order of every later epoch is the same.
    assert [again[s] for s in later] == [straight[s] for s in later]
    assert resumed.stats["steps"] == 12


class Marker:
    """Unpickling this would create ``path``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_a_crafted_checkpoint_never_runs_its_payload(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.pt"
    torch.save({"format": "snopt-checkpoint", "version": 1, "model": Marker(marker)}, ckpt)
    with pytest.raises(CheckpointError, match=r"evil\.pt.*holds objects other than tensors"):
        train(checkpoint=ckpt, resume=True)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_a_raw_pickle_is_reported_as_not_data_and_never_unpickled(tmp_path, protocol):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "raw.pt"
    ckpt.write_bytes(pickle.dumps(Marker(marker), protocol=protocol))
    # No torch warning about the pickle's protocol either: the file never reaches torch.load.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(CheckpointError, match=r"raw\.pt.*holds objects other than tensors.*system"):
            read_checkpoint(ckpt)
    assert not marker.exists()
    ckpt.write_bytes(pickle.dumps({"model": {}}, protocol=protocol))
    with pytest.raises(CheckpointError, match="is a raw pickle, not a snopt checkpoint"):
        read_checkpoint(ckpt)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is empty"),
        (b"not a torch file at all", "truncated or corrupt"),
        ("truncated", "truncated or corrupt"),
        ("plain", "not a snopt checkpoint"),
    ],
)
def test_broken_checkpoints_give_one_error_naming_the_file(tmp_path, content, message):
    ckpt = tmp_path / "bad.pt"
    if content == "truncated":
        train(epochs=1, checkpoint=ckpt)
        ckpt.write_bytes(ckpt.read_bytes()[:200])
    elif content == "plain":
        torch.save({"model": {}}, ckpt)
    else:
        ckpt.write_bytes(content)
    with pytest.raises(CheckpointError, match=re.escape(str(ckpt)) + ".*" + message):
        train(checkpoint=ckpt, resume=True)


def test_another_models_checkpoint_names_what_does_not_match(tmp_path):
    ckpt = tmp_path / "a.pt"
    train(epochs=1, checkpoint=ckpt)
    with pytest.raises(
        CheckpointError, match=r"a\.pt.*does not match this model.*1\.field\.func\.l1\.bias has shape"
    ):
        train(checkpoint=ckpt, resume=True, width=5)
    with pytest.raises(
        CheckpointError, match=r"written for optimizer 'SGD', but this run's optimizer is 'Adam'"
    ):
        train(checkpoint=ckpt, resume=True, opt="adam")


def test_an_unwritable_checkpoint_path_fails_before_training(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"`checkpoint` must be in a folder that can be created"):
        train(checkpoint=tmp_path / "file" / "run.pt")
    with pytest.raises(ValueError, match=r"`checkpoint` must be a file path.*is a folder"):
        train(checkpoint=tmp_path)


def test_empty_loaders_are_refused_before_training():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train_loader, _ = make_loaders()
    empty = DataLoader(TensorDataset(torch.zeros(0, 4), torch.zeros(0).long()), batch_size=4)
    with pytest.raises(ValueError, match=r"`val_loader` must yield at least one batch"):
        fit(model, train_loader, empty, optimizer=opt, loss_fn=nn.functional.cross_entropy, epochs=1)
    with pytest.raises(ValueError, match=r"`train_loader` must yield at least one batch"):
        fit(model, empty, None, optimizer=opt, loss_fn=nn.functional.cross_entropy, epochs=1)


def test_an_empty_iterable_without_len_is_not_a_completed_run():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"`train_loader` yielded no batch"):
        fit(
            model,
            iter([]),
            None,
            optimizer=opt,
            loss_fn=nn.functional.cross_entropy,
            epochs=1,
            progress=False,
        )
    _, val = make_loaders()
    with pytest.raises((ValueError, TrainingError), match=r"`val_loader` yielded no samples"):
        fit(
            model,
            make_loaders()[0],
            iter([]),
            optimizer=opt,
            loss_fn=nn.functional.cross_entropy,
            epochs=1,
            progress=False,
        )
