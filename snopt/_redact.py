"""One helper that hides the credentials of a URL before it is printed, logged or stored.

Every URL snopt shows or writes (storage URLs in reports, tracking URIs in journal headers,
study attributes and warnings) goes through :func:`redact_url`, so a password given on the
command line never leaves the process.
"""

from __future__ import annotations

import re
from typing import Any

#: What a hidden password (or token) is replaced with.
MASK = "***"

# scheme://user:password@host...  (the password may hold any character but '@' and '/').
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^:/@\s]*):(?P<secret>[^@/\s]*)@")
# https://token@host (no user name: over HTTP the whole user part is a secret); a database URL's
# postgresql://user@host names a user, not a secret.
_TOKEN = re.compile(r"(?P<scheme>https?://)(?P<secret>[^:/@\s]+)@", re.I)
# ?password=...&token=... in query strings.
_QUERY = re.compile(r"(?P<key>[?&](?:password|passwd|pwd|token|secret|api_key|access_token)=)[^&\s]*", re.I)


def redact_url(url: Any) -> Any:
    """``url`` with its password (and any secret in the query) replaced by ``***``.

    ``postgresql://user:pw@host/db`` -> ``postgresql://user:***@host/db``;
    ``https://TOKEN@host`` -> ``https://***@host``; ``...?password=pw`` -> ``...?password=***``.
    Anything that is not a string (None, a storage object) is returned unchanged; a string
    that holds several URLs (a message) has each of them redacted.

    Args:
        url: a URL, or a text that may contain URLs.

    Returns:
        The redacted text.
    """
    if not isinstance(url, str):
        return url
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", url)
    text = _TOKEN.sub(lambda m: m[0] if m["secret"] == MASK else f"{m['scheme']}{MASK}@", text)
    return _QUERY.sub(lambda m: f"{m['key']}{MASK}", text)


def is_redacted(url: Any) -> bool:
    """Whether ``url`` went through :func:`redact_url` and lost a secret (it cannot be used as is)."""
    return isinstance(url, str) and redact_url(url) == url and MASK in url
