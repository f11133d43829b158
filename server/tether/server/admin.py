"""What the administrator's commands read on a deployment's Redis: ``tether users find``,
``tether sessions list`` (and the e-mail form of ``tether sessions revoke``).

Read-only: ending sessions goes through :func:`tether.server.auth.sessions.revoke_from_cli`,
which fences them first. Nothing here reads or prints a password hash or a refresh secret's hash;
times are milliseconds since the epoch, as in the protocol.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tether.server.auth.errors import AuthFailure
from tether.server.auth.service import normalize_email
from tether.server.realtime.live_sockets import read_live_sockets
from tether.server.redis import keys as redis_keys
from tether.server.redis.connection import RedisClient

_SESSION_FIELDS = ["state", "uid", "created", "abs", "last", "inactive", "rotated"]


class AdminError(Exception):
    """The request names nobody, or names it badly; the message says which."""


@dataclass(frozen=True)
class UserRecord:
    user_id: str
    email: str
    created: int


@dataclass(frozen=True)
class SessionRecord:
    session_id: str
    created: int
    #: When the session's refresh token last rotated; None if it never has.
    last_refresh: int | None
    #: When it ends unless refreshed (inactivity), or at all (absolute lifetime).
    expires: int
    #: Instance id → live sockets of this session there (instances with none left out).
    instances: dict[str, int] = field(default_factory=dict)

    @property
    def live_sockets(self) -> int:
        return sum(self.instances.values())


async def find_user(redis: RedisClient, email: str) -> UserRecord:
    """The user owning ``email`` (normalised as sign-in does). Raises :class:`AdminError`."""
    try:
        normalized = normalize_email(email)
    except AuthFailure as exc:
        raise AdminError(f"{email!r}: {exc.message}") from None
    user_id = await redis.get(redis_keys.email(normalized))
    if user_id is None:
        raise AdminError(f"no user with e-mail {normalized}")
    return await get_user(redis, str(user_id))


async def get_user(redis: RedisClient, user_id: str) -> UserRecord:
    """The user ``user_id``. Raises :class:`AdminError` when there is none."""
    email, created = await redis.hmget(redis_keys.user(user_id), ["email", "created"])
    if email is None:
        raise AdminError(f"no user with id {user_id}")
    return UserRecord(user_id, str(email), int(created or 0))


async def list_sessions(redis: RedisClient, user_id: str, now_ms: int) -> list[SessionRecord]:
    """The user's active sessions at ``now_ms`` (oldest first), each with its live sockets on
    every instance that reports them."""
    sids = sorted(str(sid) for sid in await redis.smembers(redis_keys.user_sessions(user_id)))
    if not sids:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        for sid in sids:
            pipe.hmget(redis_keys.session(sid), _SESSION_FIELDS)
        rows = await pipe.execute()
    active: list[SessionRecord] = []
    for sid, row in zip(sids, rows, strict=True):
        state, uid, created, absolute, last, inactive, rotated = row
        if state != "active" or uid != user_id:
            continue
        expires = min(int(absolute), int(last) + int(inactive))
        if now_ms >= expires:
            continue  # past its deadline: the sweep ends it
        rotated_ms = int(rotated or 0)
        active.append(SessionRecord(sid, int(created), rotated_ms or None, expires))
    live = await read_live_sockets(redis, [s.session_id for s in active])
    active = [
        SessionRecord(s.session_id, s.created, s.last_refresh, s.expires, live[s.session_id])
        for s in active
    ]
    active.sort(key=lambda s: (s.created, s.session_id))
    return active
