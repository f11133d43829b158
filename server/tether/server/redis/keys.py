"""Every Redis key and channel Tether uses, defined once.

Keys that one Lua script touches together carry the same hash tag (``{…}``) so that they live
in one Redis Cluster slot. ``docs/redis.md`` documents this table; change both together.

==================================  ==========  ============================================
key                                 type        holds
==================================  ==========  ============================================
``tether:session:{SID}``            hash        a session: user, deadlines, secret hashes;
                                                after it ends, a tombstone (state=ended)
``tether:session:{SID}:partitions`` set         the data partitions the session registered
                                                before its first commit into each (TTL)
``tether:session:{SID}:ending``     string      set when the session starts ending: no
                                                partition registers after it (TTL: fence's)
``tether:user:{UID}``               hash        a user: e-mail, password hash, created
``tether:user:{UID}:sessions``      set         the user's session ids (may hold ended ones)
``tether:email:{EMAIL}``            string      the user id owning a normalised e-mail
``tether:session-deadlines``        zset        session id → deadline (ms), for the sweep
``tether:rl:{HASH}``                string      a rate-limit window counter
``tether:rl:{HASH}:calls``          set         the ids of the window's allowed hits, so a
                                                retried call counts once (TTL: the window's)
``tether:instances``                zset        instance id → its live-socket report's
                                                expiry (ms), for ``tether sessions list``
``tether:live:{INSTANCE}``          hash        session id → the instance's live sockets
                                                of that session (TTL: 3 heartbeats)
channel ``tether:session-ended``    pub/sub     one JSON event per ended session
==================================  ==========  ============================================

``tether:{tether-req:<OWNER>:<CLIENT>}:<REQUEST>`` (string, TTL: the outcome's + 60 s; OWNER and
CLIENT as in ``D:outcome`` below) holds the function and partition a mutation's requestId was
first run with, in an application that declares partitions: the outcomes live in each
partition's slot, so this one key per request decides that a requestId runs in one partition
only (:func:`request_claim`; protocol 1.1 §5 rule 4).

The data layer (:mod:`tether.server.data.store`) is split into *partitions*, each under one hash
tag: a commit touches many documents and indexes atomically, so in Redis Cluster each partition
lives in one slot (one primary's memory and CPU). The default partition (functions declared
without ``partition=``) has the tag ``{tether-data}``; partition P has ``{tether-data:<enc(P)>}``,
enc = unpadded base64url of P's UTF-8 (:func:`encode_partition`; at most
:data:`MAX_PARTITION_BYTES` bytes of P). Every partition has the same keys below, ``D`` being
``tether:{tether-data}`` or ``tether:{tether-data:<enc(P)>}`` (:class:`DataKeys`).

================================================  ======  ===================================
key (``D`` = ``tether:{tether-data}``)            type    holds
================================================  ======  ===================================
``D:version``                                     string  the partition's version: its last commit's
``D:commits``                                     stream  one entry per commit, id ``V-0``,
                                                          fields ``v`` (version), ``k``
                                                          (JSON list of the keys it wrote)
                                                          and ``t`` (Redis time, µs)
``D:doc:<TABLE>:<ID>``                            hash    a document: ``v`` version that last
                                                          wrote it, ``d`` JSON, ``c`` creation
                                                          score; deleted: only ``v`` (a
                                                          tombstone with a TTL)
``D:idx:<TABLE>:<INDEX>:<VALUES>``                zset    ids of the documents whose indexed
                                                          fields equal <VALUES>, score =
                                                          creation score (version*1000+slot)
``D:kv``                                          hash    index key → version that last
                                                          changed its membership
``D:outcome:<OWNER>:<CLIENT>:<REQUEST>``          string  a mutation's JSON outcome and
                                                          function name (TTL); OWNER =
                                                          ``anonymous`` or sha256("user:" +
                                                          userId)[:32], CLIENT =
                                                          sha256(clientId)[:32]
``D:ended:<SID>``                                 string  the fence of an ended session: a
                                                          commit under it is refused (TTL:
                                                          access-token lifetime + leeway +
                                                          60 s); holds the end's reason (the
                                                          sweep's: and a random id)
``D:attempt:<NONCE>``                             string  the outcome of a commit made without
                                                          a clientId, kept briefly so a
                                                          retried script call answers the same
================================================  ======  ===================================

``<VALUES>`` is the unpadded base64url of the canonical JSON of the indexed values
(``tether.server.data.store.encode_index_values``): injective, and free of ``{``, ``}`` and ``:``.
"""

from __future__ import annotations

import base64
import hashlib

PREFIX = "tether:"

SESSION_ENDED_CHANNEL = PREFIX + "session-ended"
SESSION_DEADLINES = PREFIX + "session-deadlines"


def session(sid: str) -> str:
    return f"{PREFIX}session:{{{sid}}}"


def session_partitions(sid: str) -> str:
    """The data partitions a session has committed into (besides the default one)."""
    return f"{PREFIX}session:{{{sid}}}:partitions"


def session_ending(sid: str) -> str:
    """Set when a session starts ending: no partition may be added to it from then on."""
    return f"{PREFIX}session:{{{sid}}}:ending"


def user(uid: str) -> str:
    return f"{PREFIX}user:{{{uid}}}"


def user_sessions(uid: str) -> str:
    return f"{PREFIX}user:{{{uid}}}:sessions"


def email(normalized: str) -> str:
    return f"{PREFIX}email:{{{normalized}}}"


def rate_limit(scope: str) -> str:
    return f"{PREFIX}rl:{{{scope}}}"


def rate_limit_calls(scope: str) -> str:
    """The ids of the allowed hits counted in :func:`rate_limit`'s window (same hash tag)."""
    return f"{PREFIX}rl:{{{scope}}}:calls"


#: Every instance that reports its live sockets (:mod:`tether.server.realtime.live_sockets`).
INSTANCES = PREFIX + "instances"


def live_sockets(instance_id: str) -> str:
    """One instance's live sockets per session: its own hash tag, so it is one key on one node
    whatever the sessions' slots."""
    return f"{PREFIX}live:{{{instance_id}}}"


# ---------------------------------------------------------------------------------- data layer

#: The hash tag every key of the default partition carries: that partition is one Redis Cluster
#: slot.
DATA_TAG = "{tether-data}"
#: Longest partition name, in UTF-8 bytes (``App.query(partition=...)``): it becomes part of
#: every key of the partition, base64url-encoded.
MAX_PARTITION_BYTES = 128

#: The owner segment of an anonymous caller's outcome keys. Never a user's: those are 32 hex
#: digits.
ANONYMOUS_OWNER = "anonymous"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def encode_partition(partition: str) -> str:
    """The hash-tag segment of ``partition``: unpadded base64url of its UTF-8, so free of ``{``,
    ``}`` and ``:``, and injective (two names share it exactly when they are equal)."""
    raw = partition.encode("utf-8", "surrogatepass")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _owner(user_id: str | None) -> str:
    return ANONYMOUS_OWNER if user_id is None else _digest("user:" + user_id)


def request_claim(user_id: str | None, client_id: str, request_id: int) -> str:
    """Which function and partition ``request_id`` of ``client_id`` (sent by ``user_id``) was
    first run with. Its own hash tag per (user, client): spread over the cluster, never in a
    partition's slot."""
    return f"{PREFIX}{{tether-req:{_owner(user_id)}:{_digest(client_id)}}}:{request_id}"


class DataKeys:
    """Every key of one data partition (``partition`` ``None``: the default partition, whose
    keys are ``tether:{tether-data}:…``; partition P's are ``tether:{tether-data:<enc(P)>}:…``,
    :func:`encode_partition`). Each partition is one hash tag, so one Cluster slot."""

    __slots__ = ("base", "commits", "index_versions", "partition", "tag", "version")

    def __init__(self, partition: str | None = None) -> None:
        self.partition = partition
        self.tag = (
            DATA_TAG if partition is None else "{tether-data:" + encode_partition(partition) + "}"
        )
        self.base = f"{PREFIX}{self.tag}:"
        self.version = self.base + "version"
        self.commits = self.base + "commits"
        self.index_versions = self.base + "kv"

    def doc_prefix(self, table: str) -> str:
        """Every document key of ``table`` is this prefix followed by the document's id."""
        return f"{self.base}doc:{table}:"

    def doc(self, table: str, doc_id: str) -> str:
        return self.doc_prefix(table) + doc_id

    def index(self, table: str, index: str, encoded_values: str) -> str:
        return f"{self.base}idx:{table}:{index}:{encoded_values}"

    def outcome(self, user_id: str | None, client_id: str, request_id: int) -> str:
        """Where the outcome of ``request_id`` of ``client_id``, sent by ``user_id`` (``None``:
        anonymous), is kept. Each user, and the anonymous caller, has its own key space: no
        user id can name the anonymous owner or another user's keys (protocol 1.1 §5 rule 4)."""
        return f"{self.base}outcome:{_owner(user_id)}:{_digest(client_id)}:{request_id}"

    def session_fence(self, session_id: str) -> str:
        """The fence of an ended session, in this partition's slot so ``commit.lua`` can check
        it (:class:`tether.server.auth.sessions.SessionStore` writes it before ending the
        session)."""
        return f"{self.base}ended:{session_id}"

    def attempt(self, nonce: str) -> str:
        return f"{self.base}attempt:{nonce}"


#: The default partition's keys.
DEFAULT_DATA = DataKeys()
_DATA = DEFAULT_DATA.base

DATA_VERSION = DEFAULT_DATA.version
DATA_COMMITS = DEFAULT_DATA.commits
DATA_INDEX_VERSIONS = DEFAULT_DATA.index_versions


def data_keys(partition: str | None) -> DataKeys:
    """The keys of ``partition`` (``None``: the default partition)."""
    return DEFAULT_DATA if partition is None else DataKeys(partition)


def data_doc_prefix(table: str) -> str:
    return DEFAULT_DATA.doc_prefix(table)


def data_doc(table: str, doc_id: str) -> str:
    return DEFAULT_DATA.doc(table, doc_id)


def data_index(table: str, index: str, encoded_values: str) -> str:
    return DEFAULT_DATA.index(table, index, encoded_values)


def data_outcome(user_id: str | None, client_id: str, request_id: int) -> str:
    """:meth:`DataKeys.outcome` in the default partition."""
    return DEFAULT_DATA.outcome(user_id, client_id, request_id)


def data_session_fence(session_id: str) -> str:
    """:meth:`DataKeys.session_fence` in the default partition."""
    return DEFAULT_DATA.session_fence(session_id)


def data_attempt(nonce: str) -> str:
    return DEFAULT_DATA.attempt(nonce)
