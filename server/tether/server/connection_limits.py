"""How many sockets one client address may hold open, and which address a socket belongs to.

Pure bookkeeping, no I/O: the HTTP and WebSocket protocols (:mod:`tether.server.compat.uvicorn`)
call :meth:`AddressCap.admit` when a socket opens (or, behind a trusted proxy, when its WebSocket
upgrade names the client) and :meth:`AddressCap.release` when it closes.

Behind a proxy every socket comes from the proxy's address: counting those would lock every user
out at once. So sockets from a trusted proxy are counted under the client that the proxy names in
``X-Forwarded-For`` (:meth:`TrustedProxies.client_address`), and only for WebSocket upgrades, the
connections a client keeps open; the proxy's plain HTTP sockets carry many clients' requests in
turn and are bounded by the request deadline instead.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Hashable, Iterable

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: IPv6 clients are counted per /64: one subscriber is routinely given a whole /64 and may
#: change address within it at will, so counting single addresses would cap nothing.
IPV6_PREFIX = 64

#: Addresses whose answers :func:`address_key` and :meth:`TrustedProxies.__contains__` remember:
#: both run for every socket, and parsing an address costs more than the rest of the check. The
#: answers depend on the string alone; the bound keeps an address churn (every ``X-Forwarded-For``
#: a client can make up) from growing memory.
ADDRESS_CACHE_SIZE = 4096
#: Longest string whose answer is remembered. Every IP address is shorter (an IPv6 one with a
#: zone included); a longer string (an ``X-Forwarded-For`` hop a client made up, up to the
#: header's size) is answered without being kept, so the caches hold at most a few hundred kB.
MAX_CACHED_ADDRESS_CHARS = 64


def address_key(host: str) -> str:
    """What the per-address cap counts ``host`` under: an IPv4 address itself (an IPv4-mapped
    IPv6 one as IPv4), an IPv6 address's /64, anything else (a Unix socket's name) as given."""
    if len(host) > MAX_CACHED_ADDRESS_CHARS:
        return _address_key(host)
    return _cached_address_key(host)


def _address_key(host: str) -> str:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, IPV6_PREFIX), strict=False))
    return str(address)


_cached_address_key = functools.lru_cache(maxsize=ADDRESS_CACHE_SIZE)(_address_key)


class AddressCap:
    """At most ``limit`` open sockets per client address (``limit`` 0: no limit).

    A socket is identified by any hashable ``key`` (its transport); admitting the same key again
    moves it to the new address, releasing it twice is harmless.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._address_of: dict[Hashable, str] = {}
        self._counts: dict[str, int] = {}

    def admit(self, key: Hashable, address: str) -> bool:
        """Count ``key`` under ``address``; False (and nothing counted) when it is full."""
        previous = self._address_of.get(key)
        if previous == address:
            return True
        if self.limit and self._counts.get(address, 0) >= self.limit:
            return False
        self.release(key)
        self._address_of[key] = address
        self._counts[address] = self._counts.get(address, 0) + 1
        return True

    def release(self, key: Hashable) -> None:
        """Stop counting ``key``; a key never admitted (or already released) is ignored."""
        address = self._address_of.pop(key, None)
        if address is None:
            return
        left = self._counts[address] - 1
        if left:
            self._counts[address] = left
        else:
            # Addresses with no socket are forgotten: memory follows open sockets, not history.
            del self._counts[address]

    def count(self, address: str) -> int:
        return self._counts.get(address, 0)

    def __len__(self) -> int:
        """Sockets counted."""
        return len(self._address_of)


class TrustedProxies:
    """The proxies of ``TETHER_TRUSTED_PROXIES`` (addresses, networks, or ``*`` for any)."""

    def __init__(self, entries: Iterable[str]) -> None:
        entries = list(entries)
        self.any = "*" in entries
        self._networks: list[IPNetwork] = [
            ipaddress.ip_network(e, strict=False) for e in entries if e != "*"
        ]
        self._known: dict[str, bool] = {}  # host -> trusted, at most ADDRESS_CACHE_SIZE

    def __bool__(self) -> bool:
        return self.any or bool(self._networks)

    def __contains__(self, host: object) -> bool:
        if self.any:
            return True
        if not self._networks or not isinstance(host, str):
            return False  # no proxy (the default): nothing to parse
        known = self._known.get(host)
        if known is None:
            try:
                address = ipaddress.ip_address(host)
            except ValueError:
                known = False
            else:
                if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
                    # A dual-stack listener sees an IPv4 proxy as ::ffff:a.b.c.d.
                    address = address.ipv4_mapped
                known = any(address in network for network in self._networks)
            if len(host) <= MAX_CACHED_ADDRESS_CHARS:
                if len(self._known) >= ADDRESS_CACHE_SIZE:
                    self._known.clear()
                self._known[host] = known
        return known

    def client_address(self, peer: str, forwarded_for: str | None) -> str:
        """The client a socket from ``peer`` speaks for.

        ``peer`` itself unless it is a trusted proxy; then the nearest address in
        ``forwarded_for`` (read from the right, as each proxy appends the address it received
        from) that is not a trusted proxy — the same rule uvicorn applies to the request's
        ``client``, so the count and the rate limits agree. A trusted proxy that names no one
        speaks for itself.
        """
        if peer not in self or not forwarded_for:
            return peer
        hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
        for hop in reversed(hops):
            if hop not in self:
                return hop
        return hops[0] if hops else peer
