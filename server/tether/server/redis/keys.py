"""Every Redis key and channel Tether uses, defined once.

Keys that one Lua script touches together carry the same hash tag (``{…}``) so that they live
in one Redis Cluster slot. ``docs/redis.md`` documents this table; change both together.

==================================  ==========  ============================================
key                                 type        holds
==================================  ==========  ============================================
``tether:session:{SID}``            hash        a session: user, deadlines, secret hashes;
                                                after it ends, a tombstone (state=ended)
``tether:user:{UID}``               hash        a user: e-mail, password hash, created
``tether:user:{UID}:sessions``      set         the user's session ids (may hold ended ones)
``tether:email:{EMAIL}``            string      the user id owning a normalised e-mail
``tether:session-deadlines``        zset        session id → deadline (ms), for the sweep
``tether:rl:{HASH}``                string      a rate-limit window counter
``tether:instances``                zset        instance id → its live-socket report's
                                                expiry (ms), for ``tether sessions list``
``tether:live:{INSTANCE}``          hash        session id → the instance's live sockets
                                                of that session (TTL: 3 heartbeats)
channel ``tether:session-ended``    pub/sub     one JSON event per ended session
==================================  ==========  ============================================

The data layer (:mod:`tether.server.data.store`) keeps every key under the one hash tag
``{tether-data}``: a commit touches many documents and indexes atomically, so in Redis Cluster the
whole data layer lives in one slot (one primary's memory and CPU).

================================================  ======  ===================================
key (``D`` = ``tether:{tether-data}``)            type    holds
================================================  ======  ===================================
``D:version``                                     string  the global version: the last commit's
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

import hashlib

PREFIX = "tether:"

SESSION_ENDED_CHANNEL = PREFIX + "session-ended"
SESSION_DEADLINES = PREFIX + "session-deadlines"


def session(sid: str) -> str:
    return f"{PREFIX}session:{{{sid}}}"


def user(uid: str) -> str:
    return f"{PREFIX}user:{{{uid}}}"


def user_sessions(uid: str) -> str:
    return f"{PREFIX}user:{{{uid}}}:sessions"


def email(normalized: str) -> str:
    return f"{PREFIX}email:{{{normalized}}}"


def rate_limit(scope: str) -> str:
    return f"{PREFIX}rl:{{{scope}}}"


#: Every instance that reports its live sockets (:mod:`tether.server.realtime.live_sockets`).
INSTANCES = PREFIX + "instances"


def live_sockets(instance_id: str) -> str:
    """One instance's live sockets per session: its own hash tag, so it is one key on one node
    whatever the sessions' slots."""
    return f"{PREFIX}live:{{{instance_id}}}"


# ---------------------------------------------------------------------------------- data layer

#: The hash tag every data-layer key carries: the data layer is one Redis Cluster slot.
DATA_TAG = "{tether-data}"
_DATA = f"{PREFIX}{DATA_TAG}:"

DATA_VERSION = _DATA + "version"
DATA_COMMITS = _DATA + "commits"
DATA_INDEX_VERSIONS = _DATA + "kv"


def data_doc_prefix(table: str) -> str:
    """Every document key of ``table`` is this prefix followed by the document's id."""
    return f"{_DATA}doc:{table}:"


def data_doc(table: str, doc_id: str) -> str:
    return data_doc_prefix(table) + doc_id


def data_index(table: str, index: str, encoded_values: str) -> str:
    return f"{_DATA}idx:{table}:{index}:{encoded_values}"


#: The owner segment of an anonymous caller's outcome keys. Never a user's: those are 32 hex
#: digits.
ANONYMOUS_OWNER = "anonymous"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def data_outcome(user_id: str | None, client_id: str, request_id: int) -> str:
    """Where the outcome of ``request_id`` of ``client_id``, sent by ``user_id`` (``None``:
    anonymous), is kept. Each user, and the anonymous caller, has its own key space: no user id
    can name the anonymous owner or another user's keys (protocol 1.1 §5 rule 4)."""
    owner = ANONYMOUS_OWNER if user_id is None else _digest("user:" + user_id)
    return f"{_DATA}outcome:{owner}:{_digest(client_id)}:{request_id}"


def data_session_fence(session_id: str) -> str:
    """The fence of an ended session, in the data slot so ``commit.lua`` can check it
    (:class:`tether.server.auth.sessions.SessionStore` writes it before ending the session)."""
    return f"{_DATA}ended:{session_id}"


def data_attempt(nonce: str) -> str:
    return f"{_DATA}attempt:{nonce}"
