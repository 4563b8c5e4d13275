"""SIGTERM and SIGINT as a clean stop: an interrupt that names its signal, and the exit status.

``kill``, ``timeout`` and job schedulers stop a process with SIGTERM, whose default action
ends Python at once: no checkpoint, an MLflow run left RUNNING, an Optuna trial left
RUNNING.  Inside :func:`terminate_as_interrupt` SIGTERM (and SIGINT, unless the process
ignores it) raises :class:`Terminated`, a ``KeyboardInterrupt``, so that every layer that
cleans up after Ctrl-C (the trainer's checkpoint, the MLflow runs, the Optuna trial) does
the same for a scheduler's stop.  Only the first signal raises: later ones, while that
cleanup runs, are reported and ignored (SIGKILL still ends the process).

A stop raised in the middle of a database call can leave its connection inside an open
transaction (a write cut in half, or a read whose rows were not yet fetched), holding the
database's lock while the cleanup tries to record the stop (SQLite: "database is locked").
Code that calls a store wraps the call in :func:`deferred_signals`: a signal that arrives
inside it raises when the call is done, and a second signal while one is held raises at
once (a store that does not answer cannot hold a stop back).  This module imports nothing
heavy, so the command line can use it before torch is loaded.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

#: The signals that stop a run cleanly.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

# The signal being handled by the outermost scope (None: no stop under way), and how deep
# the scopes are nested (the trainer's inside the command line's).
_stopping: str | None = None
_depth = 0
# A signal held until the outermost deferred_signals block ends, and how deep those blocks are.
_pending: int | None = None
_defer_depth = 0


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGINT received: a ``KeyboardInterrupt`` that names its signal.

    Args:
        signum: the signal, as a number or a name (``"SIGTERM"``).
        message: what was stopped (default: ``"interrupted by <signal>"``).

    Attributes:
        signal_name: ``"SIGTERM"`` or ``"SIGINT"``.
        exit_status: the conventional exit status after it, 128 + the signal number.
    """

    def __init__(self, signum: int | str, message: str | None = None) -> None:
        sig = signal.Signals[signum] if isinstance(signum, str) else signal.Signals(signum)
        self.signal_name = sig.name
        self.exit_status = 128 + int(sig)
        super().__init__(message or f"interrupted by {self.signal_name}")


def signal_name(exc: BaseException) -> str:
    """The signal behind an interrupt: a :class:`Terminated`'s own, else SIGINT (Ctrl-C)."""
    return exc.signal_name if isinstance(exc, Terminated) else "SIGINT"


def exit_status(exc: BaseException) -> int:
    """The exit status of a process stopped by ``exc``: 128 + its signal (143 SIGTERM, 130 SIGINT)."""
    return exc.exit_status if isinstance(exc, Terminated) else 128 + int(signal.SIGINT)


def interrupt_reason(exc: BaseException) -> str:
    """One line on an interrupt that names its signal, e.g. ``"interrupted by SIGTERM"``."""
    text, name = str(exc), signal_name(exc)
    return text if name in text else f"interrupted by {name}" + (f": {text}" if text else "")


def _handler(signum: int, frame: Any) -> None:
    global _stopping, _pending
    name = signal.Signals(signum).name
    if _pending is not None:
        # A second signal while the first waits for a store write: do not wait.
        _pending = None
        raise Terminated(signum)
    if _stopping is not None:
        # The first signal's cleanup is running (checkpoint, MLflow, Optuna): let it finish.
        print(
            f"snopt: {name} received while stopping after {_stopping}; cleaning up "
            "(SIGKILL ends the process at once)",
            file=sys.stderr,
            flush=True,
        )
        return
    _stopping = name
    if _defer_depth > 0:
        _pending = signum  # raised when the write under way ends
        return
    raise Terminated(signum)


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold a stop signal that arrives inside the block until the block ends, then raise it.

    For calls to a store (MLflow's, Optuna's) that an exception must not cut in half; a
    second signal inside the block raises at once.  Outside :func:`terminate_as_interrupt`
    and outside the main thread this does nothing.
    """
    global _defer_depth, _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _defer_depth += 1
    try:
        yield
    finally:
        _defer_depth -= 1
        if _defer_depth == 0 and _pending is not None:
            signum, _pending = _pending, None
            raise Terminated(signum)


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Raise :class:`Terminated` on SIGTERM and SIGINT inside the block; restore the handlers after.

    SIGINT is taken over only where Python's own Ctrl-C handler is installed, so a process
    started with SIGINT ignored (a background job of a shell) keeps ignoring it.  Scopes
    nest; signals are handled in the main thread only, so elsewhere this does nothing.
    """
    global _depth, _stopping
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for sig in STOP_SIGNALS:
        current = signal.getsignal(sig)
        if sig == signal.SIGINT and current not in (signal.default_int_handler, _handler):
            continue
        previous[sig] = signal.signal(sig, _handler)
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if _depth == 0:
            _stopping = _pending = None
