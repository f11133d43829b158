"""Which browser Origins may talk to this instance (``TETHER_ALLOWED_ORIGINS``).

One rule for the three places that ask: the ``/sync`` upgrade, the HTTP API's CORS answers
(:mod:`tether.server.cors`) and the Origin check of cookie-authenticated requests
(:mod:`tether.server.auth.http`), so a page allowed to open ``/sync`` is allowed to sign in and
no other.
"""

from __future__ import annotations

import fnmatch
from urllib.parse import urlsplit

#: Hosts whose ``http://`` origins may receive the refresh cookie without ``Secure`` (§5 rule 10).
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})  # urlsplit drops the brackets


def origin_allowed(origin: str, host: str | None, allowed: tuple[str, ...]) -> bool:
    """Is a browser ``Origin`` allowed? ``host`` is the request's ``Host`` header (for the
    pattern ``self``); patterns may use ``*`` for a port (``http://localhost:*``)."""
    origin = origin.rstrip("/").lower()
    for pattern in allowed:
        if pattern == "*":
            return True
        if pattern == "self":
            if host and origin in (f"http://{host}".lower(), f"https://{host}".lower()):
                return True
            continue
        if fnmatch.fnmatchcase(origin, pattern.lower()):
            return True
    return False


def is_loopback_http(origin: str) -> bool:
    """Is ``origin`` plain ``http://`` on a loopback host (``localhost``, ``127.0.0.1``,
    ``[::1]``, any port)? The only origins whose refresh cookie may go without ``Secure``."""
    parts = urlsplit(origin.strip().lower())
    try:
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        return False
    return (
        parts.scheme == "http"
        and parts.hostname in LOOPBACK_HOSTS
        and "@" not in parts.netloc
        and not parts.path.strip("/")
    )
