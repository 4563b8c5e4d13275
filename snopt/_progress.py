"""Progress of long work: a tqdm bar on a terminal, a plain line every few seconds elsewhere.

Logs, CI consoles and pipes get no cursor codes: when the stream is not a terminal,
:func:`progress_bar` returns a :class:`PlainProgress` that writes one self-contained line
(``train 40/92 step (43%) loss=0.61 T=1.2, 12 s``) at most every ``interval`` seconds and a
last one when it closes, unless that would repeat the line before it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from typing import IO, Any

#: Seconds between two plain progress lines.
PLAIN_INTERVAL = 10.0


class PlainProgress:
    """The subset of tqdm's interface snopt uses, printed as occasional plain lines.

    Args:
        total: the amount that completes the work (None: unknown).
        initial: the amount done before this bar started (a resumed run).
        desc: what is progressing (``train``, a study's name).
        unit: the unit of ``total`` (``step``, ``NFE``, ``study``).
        stream: where lines go (default: stderr).
        interval: seconds between lines.
    """

    def __init__(
        self,
        total: float | None,
        initial: float = 0,
        *,
        desc: str = "",
        unit: str = "it",
        stream: IO[str] | None = None,
        interval: float = PLAIN_INTERVAL,
    ) -> None:
        self.total, self.n, self.desc, self.unit = total, initial, desc, unit
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.postfix: dict[str, Any] = {}
        self._start = time.monotonic()
        self._last = self._start
        self._written: tuple[float, dict[str, Any]] | None = None  # count and postfix last written
        self._closed = False

    def update(self, n: float = 1) -> None:
        """Count ``n`` more units; write a line if ``interval`` seconds passed since the last."""
        self.n += n
        self._maybe_write()

    def set_postfix(self, postfix: Mapping[str, Any] | None = None, refresh: bool = True) -> None:
        """Values shown after the count (``loss=0.61``)."""
        self.postfix = dict(postfix or {})
        if refresh:
            self._maybe_write()

    def refresh(self) -> None:
        """Write a line if ``interval`` seconds passed since the last."""
        self._maybe_write()

    def close(self) -> None:
        """Write the final line (once), unless the last line written already says the same."""
        if not self._closed:
            self._closed = True
            if self._written != (self.n, self.postfix):
                self._write()

    def line(self) -> str:
        """The current progress as one line."""
        count = f"{self.n:g}" if self.total is None else f"{self.n:g}/{self.total:g}"
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        post = " ".join(f"{k}={v}" for k, v in self.postfix.items())
        elapsed = time.monotonic() - self._start
        return f"{self.desc} {count} {self.unit}{share}{' ' + post if post else ''}, {elapsed:.0f} s"

    def _maybe_write(self) -> None:
        if time.monotonic() - self._last >= self.interval:
            self._write()

    def _write(self) -> None:
        self._last = time.monotonic()
        self._written = (self.n, dict(self.postfix))
        print(self.line(), file=self.stream, flush=True)


def progress_bar(
    total: float | None,
    initial: float = 0,
    *,
    desc: str,
    unit: str,
    enabled: bool = True,
    leave: bool = True,
) -> Any:
    """A progress bar for ``total`` units: tqdm on a terminal, :class:`PlainProgress` otherwise.

    Args:
        total, initial, desc, unit: as in :class:`PlainProgress`.
        enabled: False returns None (no output at all).
        leave: keep the finished tqdm bar on screen.
    """
    if not enabled:
        return None
    stream = sys.stderr
    if not (hasattr(stream, "isatty") and stream.isatty()):
        return PlainProgress(total, initial, desc=desc, unit=unit, stream=stream)
    from tqdm import tqdm

    return tqdm(
        total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, leave=leave, file=stream
    )
