"""SIGTERM and SIGINT as a clean stop: the interrupt names its signal, a stop under way is not cut short."""

import os
import signal

import pytest
import torch
from torch import nn

from snopt import fit
from snopt._signals import (
    Terminated,
    deferred_signals,
    exit_status,
    interrupt_reason,
    terminate_as_interrupt,
)
from snopt._training import Callback


@pytest.fixture(autouse=True)
def _sigint_as_in_a_terminal():
    """Python's own Ctrl-C handler for each test, whatever pytest inherited.

    A shell starts a background job with SIGINT ignored, and :func:`terminate_as_interrupt`
    rightly keeps an ignored SIGINT ignored: without this, the SIGINT cases would test that.
    """
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _kill_self(sig: int) -> None:
    os.kill(os.getpid(), sig)


@pytest.mark.parametrize(
    "sig,name,status", [(signal.SIGTERM, "SIGTERM", 143), (signal.SIGINT, "SIGINT", 130)]
)
def test_a_stop_signal_raises_an_interrupt_that_names_it(sig, name, status):
    before = signal.getsignal(sig)
    with pytest.raises(Terminated) as info, terminate_as_interrupt():
        _kill_self(sig)
    assert isinstance(info.value, KeyboardInterrupt)  # what Optuna and the trainer already handle
    assert info.value.signal_name == name and exit_status(info.value) == status
    assert name in interrupt_reason(info.value)
    assert signal.getsignal(sig) is before


def test_a_second_signal_does_not_cut_the_cleanup_short():
    cleaned = False
    with pytest.raises(Terminated), terminate_as_interrupt():
        try:
            _kill_self(signal.SIGTERM)
        finally:
            _kill_self(signal.SIGTERM)  # while the first stop cleans up (a scheduler's repeat)
            _kill_self(signal.SIGINT)
            cleaned = True
    assert cleaned
    with pytest.raises(Terminated), terminate_as_interrupt():  # the next scope stops again
        _kill_self(signal.SIGTERM)


def test_an_ignored_sigint_stays_ignored():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a shell's background job
    try:
        with terminate_as_interrupt():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            _kill_self(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_plain_ctrl_c_counts_as_sigint():
    assert exit_status(KeyboardInterrupt()) == 130
    assert interrupt_reason(KeyboardInterrupt()) == "interrupted by SIGINT"


class _SignalAt(Callback):
    def __init__(self, step: int, sig: int) -> None:
        self.step, self.sig = step, sig

    def on_step_end(self, trainer, record):
        if trainer.step == self.step:
            _kill_self(self.sig)


@pytest.mark.parametrize("sig,name", [(signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "SIGINT")])
def test_fit_stopped_by_a_signal_checkpoints_and_says_which(tmp_path, sig, name):
    torch.manual_seed(0)
    model = nn.Linear(2, 2)
    data = [(torch.randn(8, 2), torch.randint(0, 2, (8,))) for _ in range(4)]
    ckpt = tmp_path / "c.pt"
    with pytest.warns(UserWarning, match="Interrupted at step 2 by"):
        result = fit(
            model,
            data,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            loss_fn=nn.functional.cross_entropy,
            epochs=1,
            checkpoint=ckpt,
            callbacks=[_SignalAt(2, sig)],
            progress=False,
        )
    assert result.status == "interrupted" and result.signal == name and name in result.message
    assert result.to_dict()["signal"] == name
    assert ckpt.exists() and len(result.history) == 2


def test_a_signal_inside_a_deferred_block_raises_when_the_block_ends():
    done = []
    with pytest.raises(Terminated) as info, terminate_as_interrupt():
        with deferred_signals():  # a store write under way
            _kill_self(signal.SIGTERM)
            with deferred_signals():  # nested: held until the outermost block ends
                done.append("inner")
            done.append("write finished")
        done.append("after the block")  # never reached: the stop is raised first
    assert done == ["inner", "write finished"] and info.value.signal_name == "SIGTERM"


def test_a_second_signal_does_not_wait_for_the_deferred_block():
    done = []
    with pytest.raises(Terminated) as info, terminate_as_interrupt():
        with deferred_signals():
            _kill_self(signal.SIGTERM)
            done.append("held")
            _kill_self(signal.SIGINT)  # the user insists: a store that hangs cannot hold the stop
            done.append("never")
    assert done == ["held"] and info.value.signal_name == "SIGINT"
    with pytest.raises(Terminated), terminate_as_interrupt():  # nothing left pending for the next scope
        _kill_self(signal.SIGTERM)


def test_an_exception_of_the_deferred_block_does_not_swallow_the_stop():
    with pytest.raises(Terminated) as info, terminate_as_interrupt():
        with deferred_signals():
            _kill_self(signal.SIGTERM)
            raise OSError("the write failed")
    assert isinstance(info.value.__context__, OSError)  # both are in the traceback
