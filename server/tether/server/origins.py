"""Which browser Origins may talk to this instance (``TETHER_ALLOWED_ORIGINS``).

One rule for the three places that ask: the ``/sync`` upgrade, the HTTP API's CORS answers
(:mod:`tether.server.cors`) and the Origin check of cookie-authenticated requests
(:mod:`tether.server.auth.http`), so a page allowed to open ``/sync`` is allowed to sign in and
no other.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from urllib.parse import urlsplit

#: Hosts whose ``http://`` origins may receive the refresh cookie without ``Secure`` (§5 rule 10).
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})  # urlsplit drops the brackets


def origin_allowed(origin: str, host: str | None, allowed: tuple[str, ...]) -> bool:
    """Is a browser ``Origin`` allowed? ``host`` is the request's ``Host`` header (for the
    pattern ``self``); patterns may use ``*`` for a port (``http://localhost:*``).

    ``self`` is the origin the request was sent to, but only where the ``Host`` names a
    loopback host or an IP address. A name in ``Host`` proves nothing: a page on
    ``http://evil.example`` whose name the attacker re-points at this server (DNS rebinding)
    sends ``Host: evil.example`` with ``Origin: http://evil.example``. A server known by a name
    lists that name's origin (:func:`public_origin` of ``TETHER_PUBLIC_URL`` is added to
    ``self`` by the settings)."""
    origin = origin.rstrip("/").lower()
    for pattern in allowed:
        if pattern == "*":
            return True
        if pattern == "self":
            if (
                host
                and _not_rebindable(host)
                and origin in (f"http://{host}".lower(), f"https://{host}".lower())
            ):
                return True
            continue
        if _pattern(pattern).fullmatch(origin):
            return True
    return False


@functools.lru_cache(maxsize=256)
def _pattern(pattern: str) -> re.Pattern[str]:
    """``pattern`` (lower-cased) as a regex in which ``*`` is the only wildcard: an IPv6
    origin's brackets (``http://[::1]:*``) and a ``?`` are literal, as in a URL (fnmatch would
    read ``[::1]`` as a character class, and the origin would never match)."""
    return re.compile(".*".join(re.escape(part) for part in pattern.lower().split("*")))


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


def _not_rebindable(host: str) -> bool:
    """Is ``host`` (a ``Host`` header) a loopback name or an IP address, which no DNS answer
    can give to another site?"""
    try:
        hostname = urlsplit(f"//{host}").hostname
    except ValueError:
        return False
    if hostname is None:
        return False
    if hostname in LOOPBACK_HOSTS:
        return True
    try:
        ipaddress.ip_address(hostname)
    except ValueError:
        return False
    return True


def public_origin(public_url: str) -> str:
    """The origin (``scheme://host[:port]``, lower case) of a URL such as
    ``TETHER_PUBLIC_URL``."""
    parts = urlsplit(public_url.strip())
    return f"{parts.scheme}://{parts.netloc}".lower()
