"""Validators for user input, importable without torch.

Each takes the argument's ``name`` and its ``value`` and returns the value (converted where
that is lossless) or raises ``ValueError``/``TypeError`` with a message that names the
argument, the rule and the value, as in
``ValueError("`lr` must be a positive number, but got lr=-1.")``.  The library, the run
configuration and the command line share them, so one input gets one message everywhere.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

#: ``check(name, value) -> value``: the shape every validator here has.
Check = Callable[[str, Any], Any]


def _fail(name: str, rule: str, value: Any) -> ValueError:
    return ValueError(f"`{name}` must be {rule}, but got {name}={value!r}.")


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def real(name: str, value: Any) -> float:
    """A finite real number (an ``int`` or ``float``, never a ``bool``)."""
    if not _is_number(value):
        raise _fail(name, "a finite real number", value)
    return float(value)


def positive(name: str, value: Any) -> float:
    """A finite number > 0."""
    if not (_is_number(value) and value > 0):
        raise _fail(name, "a positive number", value)
    return float(value)


def nonnegative(name: str, value: Any) -> float:
    """A finite number >= 0."""
    if not (_is_number(value) and value >= 0):
        raise _fail(name, "a non-negative number", value)
    return float(value)


def fraction(name: str, value: Any, *, closed_low: bool = True, closed_high: bool = True) -> float:
    """A number in [0, 1] (``closed_low=False``: in (0, 1]; ``closed_high=False``: in [0, 1))."""
    value = real(name, value)
    if not (0.0 <= value <= 1.0) or (not closed_low and value == 0.0) or (not closed_high and value == 1.0):
        rule = f"in {'[' if closed_low else '('}0, 1{']' if closed_high else ')'}"
        raise _fail(name, rule, value)
    return value


def integer(name: str, value: Any, *, low: int = 1) -> int:
    """An integer >= ``low`` (a ``bool`` is not an integer here)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        rule = "a positive integer" if low == 1 else f"an integer >= {low}"
        raise _fail(name, rule, value)
    return value


def one_of(name: str, value: Any, choices: Sequence[Any]) -> Any:
    """One of ``choices``."""
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {list(choices)}, but got {name}={value!r}.")
    return value


def optional(check: Check) -> Check:
    """``check`` that also accepts None."""

    def checked(name: str, value: Any) -> Any:
        if value is None:
            return None
        try:
            return check(name, value)
        except ValueError as exc:
            # "`x` must be a positive number, but got ..." -> "... a positive number or None, but got ..."
            raise ValueError(str(exc).replace(", but got", " or None, but got", 1)) from None

    checked.__doc__ = f"None, or {check.__doc__ or check.__name__}"
    return checked


def bounds(name: str, value: Any) -> tuple[float, float] | None:
    """None, or a pair ``(low, high)`` of numbers with ``low < high`` (infinite ends allowed)."""
    if value is None:
        return None
    try:
        low, high = value
        low, high = float(low), float(high)
    except (TypeError, ValueError):
        raise _fail(name, "None or a pair (low, high)", value) from None
    if math.isnan(low) or math.isnan(high) or not low < high:
        raise _fail(name, "a pair (low, high) with low < high", value)
    return low, high


def mapping(name: str, value: Any) -> dict[str, Any]:
    """A mapping with string keys (a copy is returned)."""
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise _fail(name, "a mapping with string keys", value)
    return dict(value)


def text(name: str, value: Any) -> str:
    """A non-empty string."""
    if not isinstance(value, str) or not value.strip():
        raise _fail(name, "a non-empty string", value)
    return value


def flag(name: str, value: Any) -> bool:
    """A bool."""
    if not isinstance(value, bool):
        raise _fail(name, "True or False", value)
    return value


def keywords(
    name: str, value: Any, fn: Callable[..., Any], *, reserved: Sequence[str] = (), owner: str = ""
) -> dict[str, Any]:
    """A mapping of keyword arguments that ``fn`` accepts, minus the ``reserved`` ones.

    Args:
        name: the argument's name in messages (``model_kwargs``).
        value: the mapping to check.
        fn: the callable the keywords go to; its signature says which names exist.
        reserved: names ``fn`` accepts but that are set elsewhere (by their own setting).
        owner: what ``fn`` builds, for the message (``"the digits model"``).

    Raises:
        ValueError: an unknown or reserved key; the message suggests the closest name.
    """
    import difflib
    import inspect

    if not isinstance(value, Mapping):
        raise TypeError(f"`{name}` must be a mapping of keyword arguments, but got {name}={value!r}.")
    params = inspect.signature(fn).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    accepted = [
        p for p, spec in params.items() if spec.kind in (spec.KEYWORD_ONLY, spec.POSITIONAL_OR_KEYWORD)
    ]
    allowed = [p for p in accepted if p not in reserved and p != "self"]
    for key in value:
        if key in reserved:
            raise ValueError(
                f"`{name}` must not set {key!r}: it has a setting of its own ({key}), "
                f"but got {name}={dict(value)!r}."
            )
        if key not in allowed and not takes_any:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" did you mean {close[0]!r}?" if close else ""
            where = f" of {owner}" if owner else ""
            raise ValueError(
                f"`{name}` has an unknown argument {key!r}{where}:{hint} (accepted: {', '.join(allowed)}), "
                f"but got {name}={dict(value)!r}."
            )
    return dict(value)


def writable_file(name: str, value: Any, *, create: bool = False) -> str:
    """A path where a file can be written.

    Checked before any work, so that a run does not fail (or lose its result) at its end.
    Nothing is made unless ``create``: a missing folder must be one that can be created in
    the nearest folder that exists (the writer makes it), so that a check that passes
    leaves no trace when a later argument is refused. ``create=True`` makes the missing
    folders now, for callers that write at once (a database file).
    """
    path = value
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise _fail(name, "a file path", value)
    file = Path(path)
    if file.is_dir():
        raise ValueError(f"`{name}` must be a file path, but {name}={str(path)!r} is a folder.")
    if file.exists():
        _try_write(name, path, file, remove=False, what="a writable file")
    else:
        _check_folder(name, path, file.parent, create=create, what="in a folder that can be created")
    return str(os.fspath(path))


def _nearest_existing(path: Path) -> Path:
    """``path`` itself or the closest of its parents that exists."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_folder(name: str, value: Any, folder: Path, *, create: bool, what: str) -> None:
    """``folder`` exists and takes files, or can be made (made now when ``create``)."""
    if create:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(
                f"`{name}` must be {what}, but got {name}={str(value)!r} ({exc.strerror or exc})."
            ) from None
    base = _nearest_existing(folder)
    if not base.is_dir():
        raise ValueError(f"`{name}` must be {what}, but got {name}={str(value)!r} ({str(base)!r} is a file).")
    _try_write(name, value, base / f".snopt.{os.getpid()}.probe", remove=True, what=what)


def _try_write(name: str, value: Any, probe: Path, *, remove: bool, what: str) -> None:
    """Open ``probe`` for appending (and remove it when ``remove``); an OSError names ``name``."""
    try:
        with open(probe, "a"):
            pass
        if remove:
            probe.unlink()
    except OSError as exc:
        raise ValueError(
            f"`{name}` must be {what}, but got {name}={str(value)!r} ({exc.strerror or exc})."
        ) from None


#: URI schemes an MLflow tracking URI may have (a database scheme may name a driver: ``mysql+pymysql``).
TRACKING_SCHEMES = ("http", "https", "file", "sqlite", "postgresql", "mysql", "mssql", "databricks", "uc")


def tracking_uri(name: str, value: Any) -> str:
    """An MLflow tracking URI with a known scheme (:data:`TRACKING_SCHEMES`) or a local folder path.

    An unknown scheme (``foo://``) is an error, not a server that is down: otherwise the
    run would be journaled forever.
    """
    from ._redact import redact_url

    if not isinstance(value, str) or not value.strip():
        raise _fail(name, "a non-empty tracking URI", value)
    if "://" not in value:
        return value
    scheme = value.split("://", 1)[0].split("+", 1)[0].lower()
    if scheme not in TRACKING_SCHEMES and not scheme.startswith("databricks"):
        raise ValueError(
            f"`{name}` must use one of the schemes {list(TRACKING_SCHEMES)} (e.g. sqlite:///mlflow.db or "
            f"http://127.0.0.1:5000), but got {name}={redact_url(value)!r}."
        )
    return value


def writable_dir(name: str, value: Any, *, create: bool = False) -> str:
    """A folder where files can be written.

    Checked before any work, so that a study or a comparison does not fail at its end.
    A missing folder must be one that can be made (see :func:`writable_file`); it is made
    now only when ``create``.
    """
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise _fail(name, "a folder path", value)
    folder = Path(value)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"`{name}` must be a folder, but {name}={str(value)!r} is a file.")
    _check_folder(name, value, folder, create=create, what="a writable folder")
    return str(os.fspath(value))


def sqlite_path(url: str) -> str | None:
    """The file of an ``sqlite:///path`` URL (None: in memory, or not an SQLite URL)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.split("+", 1)[0].lower() != "sqlite":
        return None
    path = rest[1:] if rest.startswith("/") else rest  # sqlite:///rel.db and sqlite:////abs.db
    path = path.split("?", 1)[0]
    return None if path in ("", ":memory:") else path


def writable_store(name: str, value: str) -> str:
    """A tracking URI whose local store (an SQLite file or a folder) can be written.

    A server URI is not contacted here (a server that is down is journaled, see
    :mod:`snopt.tracking`); a local store that cannot be written is an error before any work.
    """
    if "://" not in value:
        writable_dir(name, value, create=True)
        return value
    scheme = value.split("://", 1)[0].lower()
    if scheme == "file":
        from urllib.parse import urlparse

        writable_dir(name, urlparse(value).path, create=True)
    elif scheme.split("+", 1)[0] == "sqlite":
        path = sqlite_path(value)
        if path is None and value.split("://", 1)[1] in ("", "/"):
            raise _fail(name, "an SQLite URL with a file, e.g. sqlite:///mlflow.db", value)
        if path is not None:
            writable_file(name, path, create=True)
    return value


#: The largest seed every generator takes (NumPy's legacy seeding is 32-bit).
MAX_SEED = 2**32 - 1


def seed(name: str, value: Any) -> int:
    """An integer seed in [0, 2**32 - 1]."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise _fail(name, f"an integer in [0, {MAX_SEED}]", value)
    return value


def device(name: str, value: Any) -> Any:
    """``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"`` (or a torch.device).

    Whether the device exists is checked where torch is imported (:func:`snopt.fit`).
    """
    import re

    if type(value).__name__ == "device" and type(value).__module__ == "torch":
        return value
    if not isinstance(value, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", value.strip()):
        raise _fail(name, "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'", value)
    return value.strip()
