"""Sockets that never finish a request, too many sockets from one address, a process out of
file descriptors, and a flood of one log line (issue 13): the real ``tether serve`` process,
real sockets, several loopback source addresses (127.0.0.x all reach the host on Linux).

The pure parts (the per-address count, the client behind a proxy, the repeat filter) are
tested first, with an injected clock.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import socket
import time
from collections.abc import Iterator

import httpx
import pytest
import websockets.sync.client
from tether.server.connection_limits import (
    ADDRESS_CACHE_SIZE,
    MAX_CACHED_ADDRESS_CHARS,
    AddressCap,
    TrustedProxies,
    _cached_address_key,
    address_key,
)
from tether.server.log_repeats import RepeatFilter
from websockets.exceptions import InvalidStatus

from tests.conftest import ServerFactory
from tests.harness import ServerProcess

pytestmark = pytest.mark.timeout(120)

#: Longest wait for something the server does by itself (a deadline, a resumed accept loop):
#: generous for a slow machine, far below the ≥ 360 s the issue measured.
PATIENCE = 20.0


# ---------------------------------------------------------------------------------- pure parts


def test_address_cap_counts_open_sockets_per_address() -> None:
    cap = AddressCap(2)
    assert cap.admit("a", "10.0.0.1") and cap.admit("b", "10.0.0.1")
    assert not cap.admit("c", "10.0.0.1")
    assert cap.admit("c", "10.0.0.2")  # another address is not affected
    cap.release("a")
    cap.release("a")  # twice is harmless
    assert cap.admit("d", "10.0.0.1")
    assert cap.count("10.0.0.1") == 2
    for key in "bcd":
        cap.release(key)
    assert len(cap) == 0 and cap.count("10.0.0.1") == 0


def test_address_cap_moves_a_socket_to_the_client_its_proxy_names() -> None:
    cap = AddressCap(1)
    assert cap.admit("s", "proxy")
    assert cap.admit("s", "203.0.113.7")  # re-admitted under the client: the proxy is freed
    assert cap.count("proxy") == 0 and cap.count("203.0.113.7") == 1
    assert AddressCap(0).admit("x", "a") and AddressCap(0).admit("y", "a")  # 0: no limit


def test_ipv6_clients_are_counted_per_64() -> None:
    assert address_key("2001:db8:1:2:aaaa::1") == address_key("2001:db8:1:2:bbbb::7")
    assert address_key("2001:db8:1:2::1") == "2001:db8:1:2::/64"
    assert address_key("2001:db8:1:3::1") != address_key("2001:db8:1:2::1")
    assert address_key("::ffff:192.0.2.1") == "192.0.2.1"
    assert address_key("192.0.2.1") == "192.0.2.1"
    assert address_key("/tmp/tether.sock") == "/tmp/tether.sock"


def test_trusted_proxies_name_the_nearest_untrusted_hop() -> None:
    proxies = TrustedProxies(["10.0.0.0/8", "192.0.2.1"])
    assert proxies.client_address("10.1.2.3", "203.0.113.7, 192.0.2.1") == "203.0.113.7"
    # A client cannot hide behind a hop it wrote itself: the rightmost untrusted hop counts.
    assert proxies.client_address("10.1.2.3", "198.51.100.1, 203.0.113.7") == "203.0.113.7"
    assert proxies.client_address("203.0.113.9", "198.51.100.1") == "203.0.113.9"  # not a proxy
    assert proxies.client_address("10.1.2.3", None) == "10.1.2.3"
    assert TrustedProxies(["*"]).client_address("1.2.3.4", "5.6.7.8, 9.9.9.9") == "5.6.7.8"
    assert not TrustedProxies([])


def test_remembered_addresses_keep_their_answers_and_their_bound() -> None:
    """Every socket asks both questions, so their answers are remembered: the second answer
    is the first, and a churn of made-up addresses (X-Forwarded-For) stays within the bound."""
    proxies = TrustedProxies(["10.0.0.0/8"])
    hosts = ["10.1.2.3", "203.0.113.7", "not an address", "2001:db8::1", "::ffff:10.0.0.1"]
    first = [(h in proxies, address_key(h)) for h in hosts]
    assert first == [
        (True, "10.1.2.3"),
        (False, "203.0.113.7"),
        (False, "not an address"),
        (False, "2001:db8::/64"),
        (True, "10.0.0.1"),  # a dual-stack listener's view of an IPv4 proxy
    ]
    for i in range(ADDRESS_CACHE_SIZE + 10):
        host = f"198.51.{i // 256 % 256}.{i % 256}"
        assert host not in proxies and address_key(host) == host
    assert [(h in proxies, address_key(h)) for h in hosts] == first
    assert len(proxies._known) <= ADDRESS_CACHE_SIZE
    assert _cached_address_key.cache_info().currsize <= ADDRESS_CACHE_SIZE
    assert "10.9.9.9" not in TrustedProxies([])  # no proxies: nothing is parsed, nothing kept


def test_made_up_long_hops_are_answered_but_not_remembered() -> None:
    """A client behind a proxy that passes its X-Forwarded-For through chooses the hop: each may
    be as long as the header. Remembering them would keep megabytes after the sockets close."""
    proxies = TrustedProxies(["10.0.0.0/8"])
    before = (len(proxies._known), _cached_address_key.cache_info().currsize)
    for i in range(50):
        hop = f"{i:08d}" + "x" * 12_000
        assert address_key(hop) == hop and hop not in proxies
    assert (len(proxies._known), _cached_address_key.cache_info().currsize) == before
    assert all(len(h) <= MAX_CACHED_ADDRESS_CHARS for h in proxies._known)
    longest = "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255%" + "e" * 15  # a zone id, IFNAMSIZ
    assert len(longest) <= MAX_CACHED_ADDRESS_CHARS


def _record(msg: str, *args: object, level: int = logging.ERROR) -> logging.LogRecord:
    return logging.LogRecord("t", level, __file__, 1, msg, args, None)


def test_repeat_filter_logs_a_kind_once_per_interval_with_the_count() -> None:
    now = [0.0]
    repeats = RepeatFilter(10.0, clock=lambda: now[0])
    assert repeats.filter(_record("accept failed: %s", "EMFILE"))
    for i in range(1000):
        now[0] = i * 0.005
        assert not repeats.filter(_record("accept failed: %s", "EMFILE"))
    assert repeats.filter(_record("another message"))  # another kind passes
    assert repeats.filter(_record("accept failed: %s", "EMFILE", level=logging.INFO))
    now[0] = 10.0
    record = _record("accept failed: %s", "EMFILE")
    assert repeats.filter(record)
    assert record.getMessage() == "accept failed: EMFILE (repeated 1000 times)"
    # The same record reaching a second handler with this filter is not a repeat of itself.
    assert repeats.filter(record)
    assert RepeatFilter(0).filter(_record("x")) and RepeatFilter(0).filter(_record("x"))


def test_repeat_filter_forgets_the_oldest_kinds_first() -> None:
    repeats = RepeatFilter(10.0, clock=lambda: 0.0, max_kinds=2)
    for msg in ("a", "b", "c"):
        assert repeats.filter(_record(msg))
    assert repeats.filter(_record("a"))  # forgotten, so let through again
    assert not repeats.filter(_record("c"))


# ---------------------------------------------------------------------------------- helpers


def _connect(server: ServerProcess, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), source_address=(source, 0))
    sock.settimeout(PATIENCE)
    return sock


def _read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes; raises TimeoutError if it never does."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def _read_response(sock: socket.socket) -> bytes:
    """One whole response to a request on a kept-alive connection (its body has a length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536) or b"<closed>"
        assert not data.endswith(b"<closed>"), data
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def _healthz(server: ServerProcess, source: str) -> int:
    transport = httpx.HTTPTransport(local_address=source)
    with httpx.Client(transport=transport, timeout=PATIENCE) as http:
        return http.get(server.base_url + "/healthz").status_code


@contextlib.contextmanager
def _sockets() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    try:
        yield opened
    finally:
        for sock in opened:
            sock.close()


# ---------------------------------------------------------------------------------- deadlines


def test_a_half_sent_request_is_answered_408_and_closed(server_factory: ServerFactory) -> None:
    server = server_factory(env={"TETHER_REQUEST_TIMEOUT": "1"})
    head_only = _connect(server)
    head_only.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # no blank line: head unfinished
    body_short = _connect(server)
    body_short.sendall(
        b"POST /auth/signin HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\n\r\n{"
    )
    silent = _connect(server)
    second = _connect(server)  # a keep-alive connection: the deadline holds for each request
    second.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert _read_response(second).startswith(b"HTTP/1.1 200 ")
    second.sendall(b"GET /healthz HTTP/1.1\r\n")
    with head_only, body_short, silent, second:
        for sock in (head_only, body_short, second):
            answer = _read_until_closed(sock)
            assert answer.startswith(b"HTTP/1.1 408 "), answer
            assert b'"error": "invalid_request"' in answer and b"TETHER_REQUEST_TIMEOUT" in answer
        assert _read_until_closed(silent) == b""  # sent nothing: closed without an answer
    # A request sent in time is served as before.
    assert _healthz(server, "127.0.0.1") == 200


def test_keep_alive_connections_stay_open_as_long_as_the_setting_says(
    server_factory: ServerFactory,
) -> None:
    # uvicorn's own default is 5 s: a second request 7 s later shows the setting is applied.
    server = server_factory(env={"TETHER_KEEP_ALIVE_TIMEOUT": "60"})
    with _connect(server) as sock:
        for _ in range(2):
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _read_response(sock).startswith(b"HTTP/1.1 200 ")
            time.sleep(7)


# ---------------------------------------------------------------------------------- per address


def test_the_cap_refuses_one_address_and_serves_the_others(server_factory: ServerFactory) -> None:
    cap = 4
    server = server_factory(
        env={
            "TETHER_MAX_CONNECTIONS_PER_ADDRESS": str(cap),
            "TETHER_REQUEST_TIMEOUT": "600",
            "TETHER_LOG_REPEAT_INTERVAL": "600",
        }
    )
    with _sockets() as held:
        held += [_connect(server) for _ in range(cap)]
        # Accepted in order: these come after the held ones, and are refused at once.
        for _ in range(5):
            with _connect(server) as extra:
                answer = _read_until_closed(extra)
            assert answer.startswith(b"HTTP/1.1 429 "), answer
            assert b'"error": "rate_limited"' in answer
        assert _healthz(server, "127.0.0.2") == 200  # another address is served
        held.pop().close()
        deadline = time.monotonic() + PATIENCE
        while _healthz_or_none(server, "127.0.0.1") != 200:  # the freed slot is usable again
            assert time.monotonic() < deadline, "127.0.0.1 was not let in after a socket closed"
            time.sleep(0.1)
    # Five refusals, one line: the repeats are counted, not logged.
    assert server.log_text().count("refused a connection from 127.0.0.1") == 1


def _healthz_or_none(server: ServerProcess, source: str) -> int | None:
    try:
        return _healthz(server, source)
    except httpx.HTTPError:
        return None


def test_behind_a_trusted_proxy_websockets_count_for_the_forwarded_client(
    server_factory: ServerFactory,
) -> None:
    server = server_factory(
        env={"TETHER_MAX_CONNECTIONS_PER_ADDRESS": "2", "TETHER_TRUSTED_PROXIES": "127.0.0.1"}
    )

    def open_ws(client: str) -> websockets.sync.client.ClientConnection:
        return websockets.sync.client.connect(
            server.ws_url,
            additional_headers={"X-Forwarded-For": client},
            open_timeout=PATIENCE,
        )

    with contextlib.ExitStack() as stack:
        for _ in range(2):
            stack.enter_context(open_ws("203.0.113.7"))
        with pytest.raises(InvalidStatus) as refused:
            open_ws("203.0.113.7")
        assert refused.value.response.status_code == 429
        stack.enter_context(open_ws("203.0.113.8"))  # another client behind the same proxy
        # The proxy's own sockets are not capped: it carries every client's requests.
        with _sockets() as held:
            held += [_connect(server) for _ in range(4)]
            assert _healthz(server, "127.0.0.1") == 200


# ---------------------------------------------------------------------------------- descriptors


def _open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_out_of_descriptors_the_server_backs_off_and_recovers(
    server_factory: ServerFactory,
) -> None:
    # Every repeat logged (interval 0), so the log counts the accept failures themselves.
    server = server_factory(
        env={
            "TETHER_MAX_CONNECTIONS_PER_ADDRESS": "0",
            "TETHER_REQUEST_TIMEOUT": "600",
            "TETHER_LOG_REPEAT_INTERVAL": "0",
        }
    )
    assert server.pid is not None
    spare = 16
    limit = _open_descriptors(server.pid) + spare
    resource.prlimit(server.pid, resource.RLIMIT_NOFILE, (limit, limit))
    sources = [f"127.0.0.{i}" for i in range(2, 6)]
    with _sockets() as held:
        for i in range(4 * spare):
            held.append(_connect(server, sources[i % len(sources)]))
        # The server now holds all it may; the rest wait in the kernel's backlog.
        deadline = time.monotonic() + PATIENCE
        while not any(m in server.log_text() for m in ("out of file desc", "Too many open files")):
            assert time.monotonic() < deadline, "the server never ran out of descriptors"
            time.sleep(0.1)
        time.sleep(3.0)  # asyncio's own loop logged thousands of failures in this time
        flood = [
            line
            for line in server.log_text().splitlines()
            if "out of file descriptors" in line or "Too many open files" in line
        ]
        # Back-off from 0.05 s doubling to 1 s: about 8 tries in 3 s; a slow machine fewer.
        assert len(flood) <= 20, f"{len(flood)} lines, the first: {flood[:3]}"
    # Once the sockets close, the server accepts again by itself, from any address.
    deadline = time.monotonic() + PATIENCE
    while _healthz_or_none(server, "127.0.0.9") != 200:
        assert time.monotonic() < deadline, "the server did not accept again"
        time.sleep(0.2)
    assert server.returncode is None
