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
channel ``tether:session-ended``    pub/sub     one JSON event per ended session
==================================  ==========  ============================================
"""

from __future__ import annotations

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
