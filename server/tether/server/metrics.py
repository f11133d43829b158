"""Prometheus metrics of one instance, served at ``GET /metrics`` (see ``docs/operations.md``).

Each app owns one :class:`Metrics` with its own ``CollectorRegistry`` (never the process-wide
default): several apps in one process (tests, an embedding) keep separate counts.

Label values come only from small fixed vocabularies (codes, kinds, reasons, close codes), never
from ids or tokens: a label value is a time series for as long as the process lives. Hot paths
pay a dict lookup and an ``inc()`` on a child bound in advance; what can be computed when
Prometheus scrapes (connections by state, queued bytes) is computed then, by a collector, and
costs the connections nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.registry import Collector

#: Latency buckets (seconds) for pushes that should take milliseconds: revocations, fan-out.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
#: Lateness buckets (seconds) for expiry notices, which are timers: mostly under 10 ms late.
LATENESS_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: Members per committed batch of mutations on a hot key (``TETHER_MUTATION_BATCH``: 64 by
#: default; larger settings fall in the +Inf bucket past 256).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

#: Labels: the auth event ``kind`` and its ``code`` (see docs/operations.md).
AUTH_KINDS = ("authenticate", "refresh", "auth", "auth_expiring", "auth_expired", "session_revoked")
#: What a refresh-token rotation found (``lua/session_rotate.lua``'s answers).
REFRESH_OUTCOMES = ("rotated", "retried", "reused", "expired", "invalid")
#: How a mutation attempt ended.
MUTATION_RESULTS = ("committed", "error", "replayed", "conflict", "ended")
#: Where a Redis error was met / a long-lived Redis read came back.
REDIS_COMPONENTS = ("auth", "mutation", "subscriptions", "commit_watch", "session_hub", "sweep")
#: HTTP auth routes.
HTTP_ROUTES = ("signup", "signin", "refresh", "signout", "signout_all")


class Metrics:
    """Every metric of one instance, and the registry ``/metrics`` renders."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.auth_events = Counter(
            "tether_auth_events",
            "Auth answers and pushes on /sync, by kind and code",
            ["kind", "code"],
            registry=r,
        )
        self.http_requests = Counter(
            "tether_http_auth_requests",
            "Answers of the HTTP auth API, by route and code ('ok' for a success)",
            ["route", "code"],
            registry=r,
        )
        self.refresh = Counter(
            "tether_refresh",
            "Refresh-token presentations by outcome: rotated, retried (the previous token within "
            "the reuse window or with its retryKey), reused (session revoked), expired, invalid",
            ["outcome"],
            registry=r,
        )
        self.revocations = Counter(
            "tether_revocations_delivered",
            "Connections told their session ended, by how the instance learned of the end",
            ["source"],
            registry=r,
        )
        self.revocation_latency = Histogram(
            "tether_revocation_latency_seconds",
            "From a session's end (its event's timestamp: the clock of the instance that ended "
            "it) to session_revoked handed to the socket",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.notice_lateness = Histogram(
            "tether_auth_notice_lateness_seconds",
            "How long after its due time auth_expiring / auth_expired was sent",
            ["kind"],
            buckets=LATENESS_BUCKETS,
            registry=r,
        )
        self.mutations = Counter(
            "tether_mutations",
            "Mutations by result: committed, error (the function's own), replayed (a stored "
            "outcome answered), conflict (retries exhausted), ended (the session had ended)",
            ["result"],
            registry=r,
        )
        self.mutation_conflicts = Counter(
            "tether_mutation_conflicts",
            "Commit attempts refused because something the mutation read had changed",
            registry=r,
        )
        self.mutation_retries = Counter(
            "tether_mutation_retries", "Mutation runs after the first attempt", registry=r
        )
        self.mutation_batch_members = Histogram(
            "tether_mutation_batch_members",
            "Mutations committed together by one batch on a hot key (group commit), per batch "
            "committed; a mutation committed alone is not in it",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.fanout_latency = Histogram(
            "tether_fanout_latency_seconds",
            "From a commit (on this instance: its reply; another's: the stream's timestamp) "
            "to its transitions handed to the sockets",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.closes = Counter(
            "tether_connection_closes",
            "/sync connections the server closed, by close code (4008: slow consumer)",
            ["code"],
            registry=r,
        )
        self.redis_errors = Counter(
            "tether_redis_errors",
            "Redis errors met, by component",
            ["component"],
            registry=r,
        )
        self.redis_reconnects = Counter(
            "tether_redis_reconnects",
            "Long-lived Redis reads (session-ended subscription, commit watch) back after a "
            "failure",
            ["component"],
            registry=r,
        )
        # Children bound in advance for the fixed vocabularies; others are bound on first use
        # (still from fixed sets: codes), and kept.
        self._auth: dict[tuple[str, str], Any] = {}
        self._http: dict[tuple[str, str], Any] = {}
        self._closes: dict[int, Any] = {}
        self._refresh = {o: self.refresh.labels(o) for o in REFRESH_OUTCOMES}
        self._mutations = {m: self.mutations.labels(m) for m in MUTATION_RESULTS}
        self._redis_errors = {c: self.redis_errors.labels(c) for c in REDIS_COMPONENTS}
        self._redis_reconnects = {
            c: self.redis_reconnects.labels(c) for c in ("session_hub", "commit_watch")
        }
        self._lateness = {
            k: self.notice_lateness.labels(k) for k in ("auth_expiring", "auth_expired")
        }
        self._revoked = {s: self.revocations.labels(s) for s in ("event", "recheck")}

    # ------------------------------------------------------------------ recording

    def auth_event(self, kind: str, code: str) -> None:
        child = self._auth.get((kind, code))
        if child is None:
            child = self._auth[kind, code] = self.auth_events.labels(kind, code)
        child.inc()

    def http_auth(self, route: str, code: str) -> None:
        child = self._http.get((route, code))
        if child is None:
            child = self._http[route, code] = self.http_requests.labels(route, code)
        child.inc()

    def refresh_outcome(self, outcome: str) -> None:
        self._refresh[outcome].inc()

    def revocation_delivered(self, count: int, source: str) -> None:
        self._revoked[source].inc(count)

    def notice_sent(self, kind: str, lateness: float) -> None:
        self._lateness[kind].observe(max(0.0, lateness))

    def mutation(self, result: str) -> None:
        self._mutations[result].inc()

    def closed(self, code: int) -> None:
        child = self._closes.get(code)
        if child is None:
            child = self._closes[code] = self.closes.labels(str(int(code)))
        child.inc()

    def redis_error(self, component: str) -> None:
        self._redis_errors[component].inc()

    def redis_reconnect(self, component: str) -> None:
        self._redis_reconnects[component].inc()

    # ------------------------------------------------------------------ collectors

    def add_collector(self, collect: Callable[[], Iterable[Any]]) -> None:
        """Register ``collect`` (returning metric families) to run at each scrape."""
        self.registry.register(_Collector(collect))


class _Collector(Collector):
    def __init__(self, collect: Callable[[], Iterable[Any]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Any]:
        return self._collect()


_discard: Metrics | None = None


def discarded() -> Metrics:
    """A process-wide :class:`Metrics` that nothing serves: for components built without an
    app (unit tests, the admin CLI), so they need no ``if metrics`` on every count."""
    global _discard
    if _discard is None:
        _discard = Metrics()
    return _discard
