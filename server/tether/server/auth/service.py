"""The authentication service: users, sign-in, refresh, sign-out.

Transport-neutral: the HTTP API (``tether.server.auth.http``) and the ``/sync`` socket
(``authenticate`` and ``refresh``) both call it. Every refusal raises
:class:`~tether.server.auth.errors.AuthFailure` with the contract's code; each transport maps the
code to its own answer (an HTTP status, an ``auth_error``).
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from redis.exceptions import RedisError

from tether.protocol import AuthErrorCode, HTTPCode, SessionEndReason
from tether.server.auth.errors import AuthFailure
from tether.server.auth.passwords import MAX_PASSWORD_CHARS, MIN_PASSWORD_CHARS, Passwords
from tether.server.auth.rate_limits import RateLimiter, new_call
from tether.server.auth.sessions import RefreshRejected, SessionGrant, SessionStore
from tether.server.auth.tokens import AccessClaims, AccessTokens, TokenError
from tether.server.clock import Clock, system_clock, to_ms
from tether.server.logs import note_identity
from tether.server.metrics import Metrics, discarded
from tether.server.redis import keys as redis_keys
from tether.server.redis.connection import RedisClient
from tether.server.settings import Settings

log = logging.getLogger("tether.auth")

MAX_EMAIL_CHARS = 254
RETRY_KEY_MIN, RETRY_KEY_MAX = 16, 128
# Deliberately simple: one @, a dot in the domain, no spaces or control characters. Real
# validation is a mail sent.
_EMAIL = re.compile(r"^[^@\s\x00-\x1f\x7f]+@[^@\s\x00-\x1f\x7f]+\.[^@\s\x00-\x1f\x7f]+$")


@dataclass(frozen=True)
class TokenPair:
    """A session's tokens as the contract returns them (``expires_at`` in ms)."""

    user_id: str
    session_id: str
    access_token: str
    refresh_token: str
    expires_at: int
    #: When the session ends unless refreshed (ms): the refresh cookie's lifetime.
    session_deadline: int

    def to_json(self, server_time: int, *, cookie: bool = False) -> dict[str, object]:
        """The contract's token body; ``cookie``: the refresh token went into the refresh
        cookie instead, and ``refreshToken`` is ``null`` (§5 rule 10)."""
        return {
            "userId": self.user_id,
            "sessionId": self.session_id,
            "accessToken": self.access_token,
            "refreshToken": None if cookie else self.refresh_token,
            "expiresAt": self.expires_at,
            "serverTime": server_time,
        }


def normalize_email(raw: object) -> str:
    if not isinstance(raw, str):
        raise AuthFailure(HTTPCode.INVALID_REQUEST, "email must be a string")
    email = raw.strip().lower()
    if len(email) > MAX_EMAIL_CHARS or not _EMAIL.match(email):
        raise AuthFailure(HTTPCode.INVALID_REQUEST, "email is not a valid e-mail address")
    return email


def check_password(raw: object) -> str:
    if not isinstance(raw, str):
        raise AuthFailure(HTTPCode.INVALID_REQUEST, "password must be a string")
    if not MIN_PASSWORD_CHARS <= len(raw) <= MAX_PASSWORD_CHARS:
        raise AuthFailure(
            HTTPCode.INVALID_REQUEST,
            f"password must be {MIN_PASSWORD_CHARS} to {MAX_PASSWORD_CHARS} characters",
        )
    return raw


def check_retry_key(raw: object) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, str) or not RETRY_KEY_MIN <= len(raw) <= RETRY_KEY_MAX:
        raise AuthFailure(
            HTTPCode.INVALID_REQUEST,
            f"retryKey must be a string of {RETRY_KEY_MIN} to {RETRY_KEY_MAX} characters",
        )
    return raw


def _opt_str(value: bytes | str | None) -> str | None:
    # The client decodes responses; this only narrows redis-py's declared types.
    return value.decode() if isinstance(value, bytes) else value


@asynccontextmanager
async def redis_unavailable(metrics: Metrics | None = None) -> AsyncIterator[None]:
    """Turn a Redis outage into an ``unavailable`` failure: retry later, never a sign-out."""
    try:
        yield
    except RedisError as exc:
        raise _unavailable(exc, metrics) from None


def _unavailable(exc: RedisError, metrics: Metrics | None) -> AuthFailure:
    """Count and log a Redis outage met by an auth operation: the failure to raise for it."""
    (metrics or discarded()).redis_error("auth")
    log.warning("redis unavailable: %s", exc.__class__.__name__)
    return AuthFailure(AuthErrorCode.UNAVAILABLE, "the session store is unreachable; retry shortly")


class AuthService:
    def __init__(
        self,
        settings: Settings,
        redis: RedisClient,
        sessions: SessionStore,
        tokens: AccessTokens,
        passwords: Passwords,
        clock: Clock = system_clock,
        *,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or discarded()
        self.redis = redis
        self.sessions = sessions
        self.tokens = tokens
        self.passwords = passwords
        self.limits = RateLimiter(redis)
        self.clock = clock

    # ------------------------------------------------------------------ helpers

    def _pair(self, grant: SessionGrant) -> TokenPair:
        now = self.clock()
        # An access token never outlives its session, so no timer is needed to end an identity
        # at the session's deadline: the token's own exp does it.
        expires = min(int(now) + self.settings.access_ttl, grant.deadline_ms // 1000)
        access = self.tokens.issue(
            user_id=grant.user_id, session_id=grant.session_id, now=now, expires_at=expires
        )
        return TokenPair(
            grant.user_id,
            grant.session_id,
            access,
            grant.refresh_token,
            expires * 1000,
            grant.deadline_ms,
        )

    async def _limit(self, scope: str, rate_name: str, call: str | None = None) -> None:
        rate = getattr(self.settings, rate_name)
        wait = await self.limits.hit(scope, rate, call)
        if wait is not None:
            raise AuthFailure(
                AuthErrorCode.RATE_LIMITED, "too many attempts; retry later", retry_after=wait
            )

    # ------------------------------------------------------------------ operations

    async def sign_up(self, email_raw: object, password_raw: object, client: str) -> TokenPair:
        email = normalize_email(email_raw)
        password = check_password(password_raw)
        async with redis_unavailable(self.metrics):
            await self._limit(f"signup:addr:{client}", "signup_limit_address")
            if await self.redis.exists(redis_keys.email(email)):
                raise AuthFailure(HTTPCode.EMAIL_TAKEN, "an account uses this e-mail")
            password_hash = await self.passwords.hash(password)
            uid = secrets.token_urlsafe(16)
            user_key = redis_keys.user(uid)
            # The user record first, then the e-mail claim: a crash in between leaves an unused
            # record, never an address that points nowhere and can't be registered again.
            await self.redis.hset(
                user_key,
                mapping={"email": email, "pw": password_hash, "created": to_ms(self.clock())},
            )
            if not await self.redis.set(redis_keys.email(email), uid, nx=True):
                await self.redis.delete(user_key)
                raise AuthFailure(HTTPCode.EMAIL_TAKEN, "an account uses this e-mail")
            grant = await self.sessions.create(uid)
        note_identity(uid, grant.session_id)
        log.info("user signed up user=%s session=%s", uid, grant.session_id)
        return self._pair(grant)

    async def sign_in(self, email_raw: object, password_raw: object, client: str) -> TokenPair:
        # Malformed input gets the same answer as a wrong password: nothing to enumerate.
        invalid = AuthFailure(HTTPCode.INVALID_CREDENTIALS, "wrong e-mail or password")
        try:
            email = normalize_email(email_raw)
            password = check_password(password_raw)
        except AuthFailure:
            raise invalid from None
        async with redis_unavailable(self.metrics):
            await self._limit(f"signin:addr:{client}", "signin_limit_address")
            # Per account, every attempt from every address counts before the password is
            # checked (so parallel guesses cannot slip past the limit), and a success is
            # refunded (so a user who signs in often is never locked out).
            account = f"signin:acct:{email}"
            hit = new_call()
            await self._limit(account, "signin_limit_account", hit)
            uid = _opt_str(await self.redis.get(redis_keys.email(email)))
            stored = _opt_str(await self.redis.hget(redis_keys.user(uid), "pw")) if uid else None
            # verify() spends the same time when the e-mail is unknown (stored is None).
            if not await self.passwords.verify(stored, password):
                raise invalid
            await self.limits.refund(account, self.settings.signin_limit_account, hit)
            assert uid is not None and stored is not None
            if self.passwords.needs_rehash(stored):
                await self.redis.hset(
                    redis_keys.user(uid), "pw", await self.passwords.hash(password)
                )
            grant = await self.sessions.create(uid)
        note_identity(uid, grant.session_id)
        log.info("user signed in user=%s session=%s", uid, grant.session_id)
        return self._pair(grant)

    async def refresh(self, refresh_token: object, retry_key_raw: object = None) -> TokenPair:
        retry_key = check_retry_key(retry_key_raw)
        parsed = self.sessions.codec.parse(refresh_token)
        if parsed is None:
            self.metrics.refresh_outcome("invalid")
            raise AuthFailure(AuthErrorCode.REFRESH_INVALID, "the refresh token is not valid")
        async with redis_unavailable(self.metrics):
            await self._limit(f"refresh:sess:{parsed.session_id}", "refresh_limit_session")
            try:
                grant = await self.sessions.rotate(refresh_token, retry_key)
            except RefreshRejected as exc:
                if exc.code == HTTPCode.REFRESH_REUSED:
                    log.warning("refresh token reuse: session %s ended", parsed.session_id)
                    raise AuthFailure(AuthErrorCode.REFRESH_REUSED, exc.message) from None
                raise AuthFailure(AuthErrorCode.REFRESH_INVALID, exc.message) from None
        note_identity(grant.user_id, grant.session_id)
        return self._pair(grant)

    async def verify_access(self, token: object) -> AccessClaims:
        """Verify an access token *and* that its session is still active.

        The one verification path of the HTTP API and the ``/sync`` socket. Raises
        :class:`AuthFailure` with ``invalid_token`` or ``token_expired`` (the token itself),
        ``session_revoked`` (its session has ended) or ``unavailable`` (Redis unreachable).
        """
        try:
            claims = self.tokens.verify(token, now=self.clock())
        except TokenError as exc:
            raise AuthFailure(exc.code, exc.message) from None
        note_identity(claims.user_id, claims.session_id)
        try:
            info = await self.sessions.lookup(claims.session_id)
        except RedisError as exc:
            # What redis_unavailable does, without its generator: every authenticate runs this.
            raise _unavailable(exc, self.metrics) from None
        if info is None or info.user_id != claims.user_id:
            raise AuthFailure(AuthErrorCode.SESSION_REVOKED, "the session has ended")
        return claims

    async def sign_out(self, token: object) -> None:
        claims = await self.verify_access(token)
        async with redis_unavailable(self.metrics):
            await self.sessions.end(claims.session_id, SessionEndReason.SIGNED_OUT)
        log.info("signed out user=%s session=%s", claims.user_id, claims.session_id)

    async def sign_out_all(self, token: object) -> None:
        claims = await self.verify_access(token)
        async with redis_unavailable(self.metrics):
            count = await self.sessions.end_all(
                claims.user_id, SessionEndReason.SIGNED_OUT_EVERYWHERE
            )
        log.info("signed out everywhere user=%s sessions=%d", claims.user_id, count)

    async def sign_out_with_refresh(self, refresh_token: object, *, everywhere: bool) -> None:
        """Sign out with a refresh token instead of an access token (the refresh cookie).

        One session: any token the session ever had ends it, as presenting an old one to
        ``refresh`` would (rule 3). Every session of the user (``everywhere``): only the
        session's current or previous token, since the request reaches past its own session.
        Raises ``refresh_invalid`` when the token does not qualify or its session has ended.
        """
        invalid = AuthFailure(AuthErrorCode.REFRESH_INVALID, "the refresh token is not valid")
        parsed = self.sessions.codec.parse(refresh_token)
        if parsed is None:
            raise invalid
        async with redis_unavailable():
            holder = await self.sessions.token_holder(parsed)
            if holder is None or (everywhere and not holder.recent):
                raise invalid
            if everywhere:
                count = await self.sessions.end_all(
                    holder.user_id, SessionEndReason.SIGNED_OUT_EVERYWHERE
                )
                log.info("signed out everywhere user=%s sessions=%d", holder.user_id, count)
                return
            if not await self.sessions.end(parsed.session_id, SessionEndReason.SIGNED_OUT):
                raise invalid  # ended meanwhile
        log.info("signed out user=%s session=%s", holder.user_id, parsed.session_id)
