"""One typed settings object, built from CLI flags and ``TETHER_*`` environment variables.

A flag beats the environment; the environment beats the default. Every value is parsed and
validated when the object is built, so a bad deployment stops at start-up with a message that
names the setting and the problem (:class:`SettingsError`), never later at first use.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import os
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tether.server.json_input import DEPTH_CEILING as JSON_DEPTH_CEILING
from tether.server.origins import public_origin

ENV_PREFIX = "TETHER_"


#: The shortest TETHER_METRICS_TOKEN accepted, and its characters (RFC 6750's b64token).
MIN_METRICS_TOKEN = 16
#: Most commits a live-query follower holds before it applies them, whatever
#: TETHER_READ_CACHE_PENDING_COMMITS says (``COMMIT_BATCH`` in tether.server.data.live, which
#: this module may not import): a larger setting would promise what is never kept.
MAX_READ_CACHE_PENDING_COMMITS = 10_000
_BEARER_TOKEN_RE = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


class SettingsError(ValueError):
    """A setting has a bad value; the message names the setting and the problem."""


@dataclass(frozen=True)
class Rate:
    """``count`` events per ``seconds``: written ``"10/300"`` in the environment."""

    count: int
    seconds: int

    def __str__(self) -> str:
        return f"{self.count}/{self.seconds}"


def _parse_int(raw: str) -> int:
    try:
        return int(raw.strip())
    except ValueError:
        raise ValueError(f"expected an integer, got {raw!r}") from None


def _parse_float(raw: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise ValueError(f"expected a number, got {raw!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {raw!r}")
    return value


def _parse_rate(raw: str) -> Rate:
    count, sep, seconds = raw.strip().partition("/")
    if not sep:
        raise ValueError(f"expected COUNT/SECONDS such as 10/60, got {raw!r}")
    rate = Rate(_parse_int(count), _parse_int(seconds))
    if rate.count < 1 or rate.seconds < 1:
        raise ValueError(f"count and seconds must be positive, got {raw!r}")
    return rate


def _parse_origins(raw: str) -> tuple[str, ...]:
    return tuple(o.strip().rstrip("/") for o in raw.split(",") if o.strip())


def _parse_proxies(raw: str) -> tuple[str, ...]:
    proxies = tuple(p.strip() for p in raw.split(",") if p.strip())
    for proxy in proxies:
        if proxy == "*":
            continue
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            message = f"{proxy!r} is not an IP address or a network like 10.0.0.0/8"
            raise ValueError(message) from None
    return proxies


def _parse_optional_int(raw: str) -> int | None:
    return _parse_int(raw) if raw.strip() else None


def _parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {raw!r}")


def _parse_str(raw: str) -> str:
    return raw.strip()


def _parse_optional_str(raw: str) -> str | None:
    return raw.strip() or None


def _parse_path(raw: str) -> Path:
    return Path(raw.strip())


def _parse_optional_path(raw: str) -> Path | None:
    return Path(raw.strip()) if raw.strip() else None


_REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster")


def _without_password(url: str) -> str:
    """``url`` with any user and password replaced by ``***`` (error messages are printed).

    Everything up to the *last* ``@`` goes: a password pasted with an unencoded ``/``, ``#`` or
    ``?`` in it would otherwise be taken for the start of the path and shown."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    return f"{scheme}://***@{rest.rpartition('@')[2]}"


def _redis_url_problem(raw_url: str) -> str | None:
    """What is wrong with a Redis URL (scheme, port, database number), or None."""
    parts = urlsplit(raw_url)
    url = _without_password(raw_url)
    if parts.scheme not in _REDIS_SCHEMES or "://" not in raw_url:
        # The scheme, not the URL: it may carry a password.
        scheme = raw_url.partition(":")[0]
        return (
            f"unsupported scheme {scheme!r} (use redis://, rediss://, unix://, "
            "redis+cluster:// or rediss+cluster://)"
        )
    if parts.scheme == "unix":
        return None if parts.path else f"{url!r} names no socket path"
    try:
        parts.port  # noqa: B018 - urlsplit checks the port only when it is read
    except ValueError:
        return f"{url!r} has a port that is not a number from 0 to 65535"
    database = parts.path.strip("/")
    if database and not database.isdigit():
        return f"{url!r}: the path must be a database number such as /0, not /{database}"
    return None


def _setting(default: Any, parse: Callable[[str], Any], doc: str, *, secret: bool = False) -> Any:
    # A secret's value stays out of the settings' repr (a log line, a traceback).
    return field(default=default, repr=not secret, metadata={"parse": parse, "doc": doc})


DEFAULT_ORIGINS = ("self", "http://localhost:*", "http://127.0.0.1:*")
#: The values of ``TETHER_SIGNING_ALGORITHM``: ``tether.server.auth.signing_keys.ALGORITHMS``,
#: spelled out so that reading settings does not load the cryptography (a test keeps the two
#: equal).
SIGNING_ALGORITHMS = ("ES256", "RS256")


@dataclass(frozen=True)
class Settings:
    """Every tunable of an instance. Field ``x`` reads ``TETHER_X``; see ``docs/settings.md``."""

    host: str = _setting("127.0.0.1", _parse_str, "address to listen on")
    port: int = _setting(8000, _parse_int, "port to listen on")
    redis_url: str | None = _setting(
        None,
        _parse_optional_str,
        "Redis URL; unset starts an embedded redis-server",
        secret=True,  # it may carry the Redis password
    )
    data_dir: Path = _setting(Path(".tether"), _parse_path, "embedded Redis data and key file")
    keys_file: Path | None = _setting(
        None, _parse_optional_path, "signing key file [DATA_DIR/keys.json]"
    )
    keys: str | None = _setting(
        None, _parse_optional_str, "the key set as JSON, instead of a file", secret=True
    )
    signing_algorithm: str = _setting(
        "ES256",
        _parse_str,
        "ES256 or RS256: the algorithm of the key a new key file starts with and of the keys "
        "`tether keys rotate` adds (existing keys keep theirs)",
    )
    public_url: str | None = _setting(
        None, _parse_optional_str, "external base URL, for the issuer and jwks_uri"
    )
    issuer: str | None = _setting(None, _parse_optional_str, "JWT iss [PUBLIC_URL or 'tether']")
    audience: str = _setting("tether", _parse_str, "JWT aud")
    access_ttl: int = _setting(3600, _parse_int, "access-token lifetime, seconds")
    session_inactive_ttl: int = _setting(
        2_592_000, _parse_int, "session ends after this many seconds without a refresh"
    )
    session_ttl: int = _setting(2_592_000, _parse_int, "session ends this long after sign-in")
    refresh_reuse_window: int = _setting(
        10, _parse_int, "seconds the previous refresh token still yields the current pair"
    )
    expiry_notice: int = _setting(60, _parse_int, "seconds before exp to push auth_expiring")
    clock_leeway: int = _setting(5, _parse_int, "tolerated clock skew on exp/nbf/iat, seconds")
    allowed_origins: tuple[str, ...] = _setting(
        DEFAULT_ORIGINS,
        _parse_origins,
        "Origins allowed to open /sync and to call the HTTP API (CORS, the refresh cookie); "
        "* allows any",
    )
    max_message_bytes: int = _setting(65536, _parse_int, "largest accepted client frame")
    max_request_bytes: int = _setting(16384, _parse_int, "largest accepted HTTP auth body")
    max_json_depth: int = _setting(
        64, _parse_int, "deepest nesting of arrays and objects in a client frame or auth body"
    )
    signin_limit_account: Rate = _setting(
        Rate(10, 300), _parse_rate, "sign-in attempts per e-mail address"
    )
    signin_limit_address: Rate = _setting(
        Rate(100, 300), _parse_rate, "sign-in attempts per client IP address"
    )
    signup_limit_address: Rate = _setting(
        Rate(20, 300), _parse_rate, "sign-ups per client IP address"
    )
    trusted_proxies: tuple[str, ...] = _setting(
        (),
        _parse_proxies,
        "proxies (IPs or networks; * any) whose X-Forwarded-For/-Proto name the client",
    )
    max_connections_per_address: int = _setting(
        256,
        _parse_int,
        "open sockets per client IP address (behind TRUSTED_PROXIES: WebSockets); 0: no limit",
    )
    request_timeout: float = _setting(
        20.0,
        _parse_float,
        "seconds an HTTP request (head and body, a WebSocket upgrade too) may take to arrive",
    )
    keep_alive_timeout: int = _setting(
        5, _parse_int, "seconds an idle HTTP connection stays open after a response"
    )
    refresh_limit_session: Rate = _setting(
        Rate(120, 60), _parse_rate, "refresh attempts per session"
    )
    send_queue_bytes: int = _setting(
        1_048_576,
        _parse_int,
        "JSON text (characters; bytes for ASCII) queued for one client before 4008",
    )
    max_connection_result_bytes: int | None = _setting(
        None,
        _parse_optional_int,
        "a connection's current query results together (JSON text, as one transition carrying"
        " all of them) before a subscribe is refused with limit_exceeded [SEND_QUEUE_BYTES]",
    )
    send_timeout: int = _setting(
        30,
        _parse_int,
        "seconds frames may wait for a client that takes nothing before it is closed with 4008",
    )
    ping_interval: int = _setting(
        20,
        _parse_int,
        "seconds between WebSocket pings; a client that has not answered one within as long"
        " again is disconnected",
    )
    max_subscriptions: int = _setting(256, _parse_int, "subscriptions per connection")
    max_followed_partitions: int = _setting(
        1000,
        _parse_int,
        "data partitions one instance follows for live queries (each a Redis connection);"
        " a subscription into one more is answered limit_exceeded",
    )
    max_connection_partitions: int = _setting(
        64,
        _parse_int,
        "data partitions one connection's subscriptions may span; a subscription into one more"
        " is answered limit_exceeded",
    )
    max_session_partitions: int = _setting(
        1000,
        _parse_int,
        "data partitions one session commits into (each is fenced when the session ends);"
        " a first commit into one more is answered limit_exceeded",
    )
    max_pending_mutations: int = _setting(64, _parse_int, "mutations in flight per connection")
    max_result_bytes: int = _setting(
        1_048_576, _parse_int, "largest encoded query or mutation result"
    )
    message_rate: Rate = _setting(
        Rate(200, 10), _parse_rate, "client messages per connection before rate_limited"
    )
    auth_rate: Rate = _setting(
        Rate(20, 60), _parse_rate, "authenticate + refresh messages per connection"
    )
    heartbeat_timeout: int = _setting(
        75, _parse_int, "close with 4009 after this many seconds without a client frame"
    )
    close_grace: int = _setting(
        10,
        _parse_int,
        "seconds a closed connection's unsent bytes may wait before its socket is aborted",
    )
    mutation_outcome_ttl: int = _setting(
        900, _parse_int, "seconds a mutation's outcome answers replays of its requestId"
    )
    mutation_retries: int = _setting(
        8, _parse_int, "times a conflicting mutation is re-run before it fails with conflict"
    )
    mutation_batch: int = _setting(
        64,
        _parse_int,
        "mutations on a hot key one instance commits together (one read, one commit); 1: none",
    )
    mutation_batch_bytes: int = _setting(
        1_048_576,
        _parse_int,
        "most bytes of writes and results one batch of mutations on a hot key gathers",
    )
    commit_stream_maxlen: int = _setting(
        100_000, _parse_int, "commits kept in the commit stream for instances catching up"
    )
    commit_values_bytes: int = _setting(
        16_384,
        _parse_int,
        "bytes of the documents a commit wrote that its stream entry carries, for the instances'"
        " read caches; past it the entry carries their keys only (0: never)",
    )
    read_cache_bytes: int = _setting(
        8_388_608,
        _parse_int,
        "estimated memory of each live-query read cache of an instance (one per followed"
        " partition), least recently used out first (0: no cache)",
    )
    read_cache_pending_commits: int = _setting(
        256,
        _parse_int,
        "commits a live-query follower keeps with their documents while it has not applied them"
        " (for its read cache); past it, their keys only (0: never)",
    )
    redis_pipeline_max_commands: int = _setting(
        64,
        _parse_int,
        "commands one auto-pipelined batch to a standalone Redis carries at most",
    )
    argon2_time_cost: int = _setting(3, _parse_int, "argon2id iterations")
    argon2_memory_kib: int = _setting(65536, _parse_int, "argon2id memory, KiB")
    argon2_parallelism: int = _setting(4, _parse_int, "argon2id lanes")
    hash_workers: int = _setting(2, _parse_int, "threads that hash passwords")
    session_sweep_interval: float = _setting(
        1.0, _parse_float, "seconds between sweeps that end expired sessions"
    )
    drain_timeout: float = _setting(
        10.0, _parse_float, "seconds a draining instance waits for sockets to close"
    )
    live_sockets_interval: float = _setting(
        10.0,
        _parse_float,
        "seconds between an instance's live-socket heartbeats; its report expires after 3",
    )
    log_level: str = _setting("info", _parse_str, "debug, info, warning or error")
    log_repeat_interval: float = _setting(
        10.0,
        _parse_float,
        "seconds during which repeats of a warning or error are counted, not logged; 0: log all",
    )
    log_format: str = _setting(
        "text", _parse_str, "text, or json: one JSON object per line with connection ids"
    )
    metrics: bool = _setting(
        True, _parse_bool, "serve Prometheus metrics at GET /metrics (keep it off the internet)"
    )
    metrics_token: str | None = _setting(
        None,
        _parse_optional_str,
        "a bearer token GET /metrics requires (Authorization: Bearer TOKEN); unset: none",
        secret=True,
    )

    # ------------------------------------------------------------------ derived values

    @property
    def effective_max_connection_result_bytes(self) -> int:
        """``max_connection_result_bytes``, which defaults to ``send_queue_bytes``."""
        limit = self.max_connection_result_bytes
        return self.send_queue_bytes if limit is None else limit

    @property
    def effective_keys_file(self) -> Path:
        return self.keys_file if self.keys_file is not None else self.data_dir / "keys.json"

    @property
    def effective_issuer(self) -> str:
        return self.issuer or self.public_url or "tether"

    # ------------------------------------------------------------------ construction

    @classmethod
    def load(
        cls,
        overrides: Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
        *,
        only: Collection[str] | None = None,
    ) -> Settings:
        """Build settings: ``overrides`` (CLI flags, as text or typed) beat ``environ``.

        With ``only`` (field names), every other setting keeps its default whatever the
        environment says: a command that needs a few settings is not stopped by a bad value of
        an unrelated one. Raises :class:`SettingsError` naming the first bad setting.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if only is not None and f.name not in only:
                continue
            name = ENV_PREFIX + f.name.upper()
            raw: Any = None
            if overrides and overrides.get(f.name) is not None:
                raw = overrides[f.name]
            elif name in env:
                raw = env[name]
            if isinstance(raw, str):
                # Flags and variables arrive as text: both go through the same parser.
                try:
                    raw = f.metadata["parse"](raw)
                except ValueError as exc:
                    raise SettingsError(f"{name}: {exc}") from None
            if raw is not None:
                values[f.name] = raw
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Check every value and their relations; raise :class:`SettingsError` on the first."""

        def fail(name: str, problem: str) -> None:
            raise SettingsError(f"{ENV_PREFIX}{name.upper()}: {problem}")

        if not 0 <= self.port <= 65535:
            fail("port", f"must be 0-65535, got {self.port}")
        positive = (
            "access_ttl",
            "session_inactive_ttl",
            "session_ttl",
            "max_message_bytes",
            "max_request_bytes",
            "argon2_time_cost",
            "argon2_parallelism",
            "hash_workers",
            "send_queue_bytes",
            "max_subscriptions",
            "max_followed_partitions",
            "max_connection_partitions",
            "max_session_partitions",
            "max_pending_mutations",
            "mutation_batch",
            "mutation_batch_bytes",
            "redis_pipeline_max_commands",
            "max_result_bytes",
            "heartbeat_timeout",
            "close_grace",
            "keep_alive_timeout",
            "send_timeout",
            "ping_interval",
        )
        for name in positive:
            if getattr(self, name) < 1:
                fail(name, f"must be at least 1, got {getattr(self, name)}")
        if not 1 <= self.max_json_depth <= JSON_DEPTH_CEILING:
            fail("max_json_depth", f"must be 1-{JSON_DEPTH_CEILING}, got {self.max_json_depth}")
        token = self.metrics_token
        if token is not None and (
            len(token) < MIN_METRICS_TOKEN or not _BEARER_TOKEN_RE.fullmatch(token)
        ):
            fail(
                "metrics_token",
                f"must be at least {MIN_METRICS_TOKEN} characters of A-Z a-z 0-9 - . _ ~ + / "
                "(then '=' padding), as a bearer token is written",
            )
        if self.mutation_outcome_ttl < 600:
            fail("mutation_outcome_ttl", "must be at least 600 (outcomes are kept 10 minutes)")
        for name in (
            "refresh_reuse_window",
            "expiry_notice",
            "clock_leeway",
            "mutation_retries",
            "commit_values_bytes",
            "read_cache_bytes",
            "read_cache_pending_commits",
            "max_connections_per_address",
            "log_repeat_interval",
        ):
            if getattr(self, name) < 0:
                fail(name, f"must not be negative, got {getattr(self, name)}")
        for name in (
            "session_sweep_interval",
            "drain_timeout",
            "live_sockets_interval",
            "request_timeout",
        ):
            if getattr(self, name) <= 0:
                fail(name, f"must be positive, got {getattr(self, name)}")
        if self.read_cache_pending_commits > MAX_READ_CACHE_PENDING_COMMITS:
            fail(
                "read_cache_pending_commits",
                f"must be at most {MAX_READ_CACHE_PENDING_COMMITS} (the commits a follower holds"
                f" at all), got {self.read_cache_pending_commits}",
            )
        limit = self.max_connection_result_bytes
        if limit is not None and not 1 <= limit <= self.send_queue_bytes:
            # Above the send limit, one transition carrying every result could exceed it.
            fail(
                "max_connection_result_bytes",
                f"must be 1 to TETHER_SEND_QUEUE_BYTES ({self.send_queue_bytes}), got {limit}",
            )
        if self.access_ttl > self.session_ttl:
            fail("access_ttl", "must not exceed TETHER_SESSION_TTL")
        if self.clock_leeway >= self.access_ttl:
            fail("clock_leeway", "must be shorter than TETHER_ACCESS_TTL")
        # OWASP password storage cheat sheet: argon2id with m >= 19 MiB and t >= 2 (or a
        # memory-heavier configuration with t = 1: m >= 46 MiB).
        if self.argon2_memory_kib < 19456 or (
            self.argon2_time_cost < 2 and self.argon2_memory_kib < 47104
        ):
            fail(
                "argon2_memory_kib",
                "argon2id below the OWASP minimum (m >= 19456 KiB with t >= 2, "
                "or m >= 47104 KiB with t = 1)",
            )
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            fail("log_level", f"must be debug, info, warning or error, got {self.log_level!r}")
        if self.signing_algorithm not in SIGNING_ALGORITHMS:
            fail(
                "signing_algorithm",
                f"must be {' or '.join(SIGNING_ALGORITHMS)}, got {self.signing_algorithm!r}",
            )
        if self.log_format not in ("text", "json"):
            fail("log_format", f"must be text or json, got {self.log_format!r}")
        if self.redis_url is not None:
            problem = _redis_url_problem(self.redis_url)
            if problem:
                fail("redis_url", problem)
        if self.public_url is not None:
            parts = urlsplit(self.public_url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                fail(
                    "public_url",
                    f"{self.public_url!r} is not a URL like https://tether.example.com",
                )
        for origin in self.allowed_origins:
            if origin not in ("*", "self") and "://" not in origin:
                fail("allowed_origins", f"{origin!r} is not an origin like https://app.example")

    @property
    def origin_rules(self) -> tuple[str, ...]:
        """``allowed_origins`` as every browser check applies it: ``self`` also stands for the
        origin of ``public_url`` (see :func:`tether.server.origins.origin_allowed`)."""
        if "self" in self.allowed_origins and self.public_url:
            return (*self.allowed_origins, public_origin(self.public_url))
        return self.allowed_origins

    @classmethod
    def unknown_variables(
        cls, environ: Mapping[str, str] | None = None, *, also_known: tuple[str, ...] = ()
    ) -> list[tuple[str, str | None]]:
        """``TETHER_*`` variables in ``environ`` that name no setting (a typo is otherwise
        silently ignored), each with the closest known name or None; ``also_known`` are
        variables other parts of ``tether`` read."""
        env = os.environ if environ is None else environ
        known = [ENV_PREFIX + f.name.upper() for f in dataclasses.fields(cls)] + list(also_known)
        # Compared without the common prefix, which would make every name look alike.
        suffixes = [name.removeprefix(ENV_PREFIX) for name in known]
        unknown = []
        for name in sorted(env):
            if name.startswith(ENV_PREFIX) and name not in known:
                suffix = name.removeprefix(ENV_PREFIX)
                close = difflib.get_close_matches(suffix, suffixes, n=1, cutoff=0.6)
                unknown.append((name, ENV_PREFIX + close[0] if close else None))
        return unknown

    @classmethod
    def documented(cls) -> list[tuple[str, str, str]]:
        """(variable, default, meaning) for every setting, for docs and ``--help``."""
        rows = []
        for f in dataclasses.fields(cls):
            default = f.default
            shown = ",".join(default) if isinstance(default, tuple) else str(default)
            rows.append((ENV_PREFIX + f.name.upper(), shown, f.metadata["doc"]))
        return rows
