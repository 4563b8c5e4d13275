"""Credentials never leave the process: one redaction for every URL snopt prints, logs or stores."""

from __future__ import annotations

import re
from typing import TypeVar, cast
from urllib.parse import urlsplit, urlunsplit

_T = TypeVar("_T")

#: Query parameters whose values are secrets (``?password=...``, ``?token=...``).
_SECRET_QUERY = re.compile(r"(?i)([?&](?:password|passwd|pwd|token|secret|key|api_key|access_token)=)[^&#]*")


def redact_url(url: _T) -> _T:
    """``url`` with its password (and secret query values) replaced by ``***``.

    ``postgresql://user:pw@host:5432/db`` becomes ``postgresql://user:***@host:5432/db``; a URL
    without credentials, a file path and anything that is not a URL come back unchanged.
    """
    if not isinstance(url, str) or "://" not in url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:  # not a URL after all: hide everything between :// and @
        return cast(_T, re.sub(r"://[^/@]*@", "://***@", url))
    if "@" in parts.netloc:
        userinfo, host = parts.netloc.rsplit("@", 1)
        user, has_password, _ = userinfo.partition(":")
        if has_password:
            userinfo = f"{user}:***"
        elif len(user) >= 20:  # a bare token as user name (https://TOKEN@host) is a secret too
            userinfo = "***"
        text = urlunsplit((parts.scheme, f"{userinfo}@{host}", parts.path, parts.query, parts.fragment))
    else:
        text = url
    return cast(_T, _SECRET_QUERY.sub(r"\1***", text))


def redact_text(text: str) -> str:
    """Every URL with credentials inside ``text`` redacted (for error messages and reports)."""
    return re.sub(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>]+", lambda m: redact_url(m.group(0)), text)


def is_redacted(url: object) -> bool:
    """Whether ``url`` lost a secret to :func:`redact_url` (so it cannot be used as it is)."""
    return isinstance(url, str) and "***" in url and redact_url(url) == url
