"""The client's session keeping, sans I/O: which credential to present, when to renew, and
what each answer means.

:class:`AuthCore` holds the auth policy of one :class:`~tether.client.connection.TetherClient`
across its connections. It never touches a socket, the token store, HTTP or a clock: the shell
feeds it events (frames the :class:`~tether.client.core.ClientCore` decoded, a lost
connection) and ``now`` (local wall-clock seconds), and carries out the :data:`Command` it
returns. An auth *operation* (settling the identity on a new connection, a renewal, adopting a
session) is a conversation: :meth:`AuthCore.begin` (or :meth:`AuthCore.adopt`) returns one
command; the shell performs it and hands the result to the method the command names; that
returns the next command, until :class:`Settled` or :class:`Retry`. One operation runs at a
time (the shell's auth lock).

The policy (``docs/client.md``, "Sessions"):

* A stored access token still fresh (``renewal_margin`` before ``exp``) is presented with
  ``authenticate``; otherwise, or when the server refuses it as expired or invalid, the stored
  refresh token is spent in-band (``refresh``), under the store's lock, with a ``retryKey``
  saved before the token is spent, and the new tokens saved before they are used. If another
  user of the store rotated meanwhile, its fresh access token is used and nothing is spent.
* ``fetch_token`` sources present a token from ``fetch_token(False)``; one refused as expired
  or invalid is replaced once with ``fetch_token(True)``.
* An ``auth_error`` code is classified by :func:`~tether.client.errors.classify_auth_code`:
  ``unavailable``/``rate_limited`` (and unknown codes) are passing (:class:`Retry`, never a
  sign-out); ``token_expired``/``invalid_token`` ask for a new token; the rest end the session.
  After ``unavailable``/``rate_limited`` the server keeps the identity the connection held
  (contract 1.1 §5 rule 2): the status stays ``AUTHENTICATED`` (with the code as ``reason``)
  and the renewal is retried before that identity's ``exp`` (:meth:`AuthCore.retry_delay`).
* Renewal is due on ``auth_expiring`` for the identity held, or at :func:`renewal_due` when
  that push went missing, or at once when the identity expected is not held.

States (style.md §15): what the client *wants* moves by the triggers of :data:`TRANSITIONS`;
whether the connection *holds* an identity follows the server's answers. Together they give
the :class:`SessionState` the table below documents; :meth:`AuthCore.validate` checks the
invariants between them, the data and the reported :class:`~tether.client.core.AuthStatus`.

==============  ===============  ===========================================================
SessionState    wants / holds    meaning
==============  ===============  ===========================================================
ANONYMOUS       anonymous / any  no credentials (or the source has none); runs as anonymous
SIGNED_OUT      signed_out / any the session ended; anonymous until a sign-in or reauthenticate
SETTLING        identity / no    credentials held, identity not confirmed on this connection
AUTHENTICATED   identity / yes   the connection holds the confirmed identity
==============  ===============  ===========================================================

(An identity may still be held, briefly, while ANONYMOUS or SIGNED_OUT: until the shell's
``authenticate`` with no token is answered. The shell sends one too when the server ended the
identity itself — ``auth_expired``, ``session_revoked``: the connection is *lapsed* and runs no
mutation until then, see :attr:`~tether.client.core.ClientCore.lapsed`.)
"""

from __future__ import annotations

import enum
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeAlias

from tether.client.core import (
    DEFAULT_RENEWAL_MARGIN,
    IDENTITY_KEEPING_AUTH_CODES,
    AuthExpired,
    AuthExpiring,
    AuthFailed,
    AuthOk,
    AuthState,
    AuthStatus,
    Identity,
    SessionRevoked,
    renewal_due,
)
from tether.client.errors import AuthErrorKind, classify_auth_code
from tether.client.token_store import StoredSession
from tether.protocol import AuthErrorCode, SessionEndReason

#: The shortest wait (seconds) before retrying a renewal that failed for a passing reason
#: while the identity is still held, however close its ``exp`` (see
#: :meth:`AuthCore.retry_delay`).
MIN_RENEWAL_RETRY = 0.25

# --------------------------------------------------------------------------------- commands


@dataclass(frozen=True, slots=True)
class CallFetchToken:
    """Call ``fetch_token(force)``; then :meth:`AuthCore.fetched` (or ``fetch_failed``)."""

    force: bool


@dataclass(frozen=True, slots=True)
class LoadSession:
    """Read the token store; then :meth:`AuthCore.loaded`."""


@dataclass(frozen=True, slots=True)
class SignIn:
    """Sign in over HTTP with the client's e-mail and password; then
    :meth:`AuthCore.signed_in` (or :meth:`AuthCore.sign_in_failed` with the error code)."""


@dataclass(frozen=True, slots=True)
class SaveSession:
    """Save ``session`` (``None``: clear the store) under the store's lock, taking it unless
    the operation holds it already (:class:`RefreshInBand`); then :meth:`AuthCore.saved`."""

    session: StoredSession | None


@dataclass(frozen=True, slots=True)
class ForgetSession:
    """Clear the store if it still holds ``session`` (a newer sign-in stays), under the
    store's lock; then :meth:`AuthCore.saved` (outside an operation: nothing follows)."""

    session: StoredSession


@dataclass(frozen=True, slots=True)
class RefreshInBand:
    """Take the store's lock for the rest of the operation and read the store; then
    :meth:`AuthCore.refresh_loaded` (or :meth:`AuthCore.lock_timed_out`)."""


@dataclass(frozen=True, slots=True)
class SendAuthenticate:
    """Send ``authenticate`` with ``token`` (``None``: become anonymous); then
    :meth:`AuthCore.answered` with its ``auth_ok``/``auth_error``."""

    token: str | None


@dataclass(frozen=True, slots=True)
class SendRefresh:
    """Send an in-band ``refresh``; then :meth:`AuthCore.answered`."""

    refresh_token: str
    retry_key: str


@dataclass(frozen=True, slots=True)
class RefreshOverHTTP:
    """Rotate ``session``'s refresh token over HTTP (``/auth/refresh``) before its access
    token is used."""

    session: StoredSession


@dataclass(frozen=True, slots=True)
class Settled:
    """The operation is over: the identity is settled (authenticated, anonymous or signed
    out)."""


@dataclass(frozen=True, slots=True)
class Retry:
    """The operation failed for a passing ``reason``: try again after a backoff."""

    reason: str


@dataclass(frozen=True, slots=True)
class Renew:
    """The keep-alive should run a renewal now."""


@dataclass(frozen=True, slots=True)
class ScheduleWake:
    """The keep-alive should sleep until ``at`` (local wall clock; ``None``: until woken)."""

    at: float | None


Command: TypeAlias = (
    CallFetchToken
    | LoadSession
    | SignIn
    | SaveSession
    | ForgetSession
    | RefreshInBand
    | SendAuthenticate
    | SendRefresh
    | Settled
    | Retry
)


# --------------------------------------------------------------------------------- states


class Source(enum.Enum):
    """Where the client's credentials come from."""

    NONE = "none"  # anonymous, until sign_in/sign_up adopts a session (then STORE)
    STORE = "store"  # a token store (with or without e-mail and password)
    FETCH = "fetch"  # fetch_token(force_refresh)


class Wants(enum.Enum):
    """What the client is after, whatever the connection holds."""

    ANONYMOUS = "anonymous"
    SIGNED_OUT = "signed_out"
    IDENTITY = "identity"


class Trigger(enum.Enum):
    """What moves :class:`Wants`."""

    #: The server confirmed an identity (``auth_ok`` with one).
    CONFIRMED = "confirmed"
    #: The source has no session (``fetch_token`` gave ``None``, the store is empty before
    #: any session was seen, or a token was answered with no identity).
    NO_SESSION = "no_session"
    #: The session ended (a sign-out code, ``session_revoked``, a sign-out).
    ENDED = "ended"
    #: The application asks for an identity (``reauthenticate``, a sign-in).
    EXPECT = "expect"


#: The transitions of :class:`Wants`; a trigger missing from a state's row is a bug.
TRANSITIONS: dict[Wants, dict[Trigger, Wants]] = {
    Wants.ANONYMOUS: {
        Trigger.EXPECT: Wants.IDENTITY,
        Trigger.NO_SESSION: Wants.ANONYMOUS,
        Trigger.ENDED: Wants.SIGNED_OUT,  # sign_out() with an empty store
        Trigger.CONFIRMED: Wants.IDENTITY,  # an answer to an adopted session's token
    },
    Wants.SIGNED_OUT: {
        Trigger.EXPECT: Wants.IDENTITY,
        Trigger.ENDED: Wants.SIGNED_OUT,
        Trigger.CONFIRMED: Wants.IDENTITY,
        # An operation that began before the session ended (a renewal awaiting fetch_token
        # when session_revoked came) learns there is no session: still signed out.
        Trigger.NO_SESSION: Wants.SIGNED_OUT,
    },
    Wants.IDENTITY: {
        Trigger.EXPECT: Wants.IDENTITY,
        Trigger.CONFIRMED: Wants.IDENTITY,
        Trigger.NO_SESSION: Wants.ANONYMOUS,
        Trigger.ENDED: Wants.SIGNED_OUT,
    },
}


class SessionState(enum.Enum):
    """The client's session state: :class:`Wants` and whether the connection holds an
    identity, as the module's table describes."""

    ANONYMOUS = "anonymous"
    SIGNED_OUT = "signed_out"
    SETTLING = "settling"
    AUTHENTICATED = "authenticated"


class _Step(enum.Enum):
    """Where an operation stands: which result the core waits for, and what it means."""

    IDLE = "idle"
    FETCH = "fetch"  # CallFetchToken
    PRESENT_FETCHED = "present_fetched"  # SendAuthenticate(a fetched token)
    ANONYMIZE = "anonymize"  # SendAuthenticate(None), fetch_token gave None
    LOAD = "load"  # LoadSession
    SIGN_IN = "sign_in"  # SignIn
    SAVE_SIGNED_IN = "save_signed_in"  # SaveSession(the signed-in session)
    PRESENT_STORED = "present_stored"  # SendAuthenticate(the stored access token)
    FORGET_THEN_END = "forget_then_end"  # ForgetSession, then the session ends
    REFRESH_LOAD = "refresh_load"  # RefreshInBand
    PRESENT_ROTATED = "present_rotated"  # SendAuthenticate(another process's access token)
    SAVE_RETRY_KEY = "save_retry_key"  # SaveSession(with a retryKey), then SendRefresh
    REFRESH = "refresh"  # SendRefresh
    SAVE_THEN_SETTLE = "save_then_settle"  # SaveSession(the new tokens)
    SAVE_THEN_END = "save_then_end"  # SaveSession(None), then the session ends
    ADOPT_SAVE = "adopt_save"  # SaveSession(an adopted session)
    ADOPT_PRESENT = "adopt_present"  # SendAuthenticate(the adopted access token)


# --------------------------------------------------------------------------------- core


class AuthCore:
    """The auth policy of one client (see the module's docstring).

    ``can_sign_in``: the client has an e-mail and password to sign in with when the store is
    empty. ``renewal_margin``: see :func:`~tether.client.core.renewal_due`.
    ``make_retry_key`` makes the ``retryKey`` of a refresh (random; injected for tests).
    """

    def __init__(
        self,
        source: Source,
        *,
        can_sign_in: bool = False,
        renewal_margin: float = DEFAULT_RENEWAL_MARGIN,
        make_retry_key: Callable[[], str] = lambda: secrets.token_urlsafe(24),
    ) -> None:
        if can_sign_in and source is not Source.STORE:
            raise ValueError("signing in needs a token store")
        self.source = source
        self.can_sign_in = can_sign_in
        self.renewal_margin = renewal_margin
        self._make_retry_key = make_retry_key
        self.wants = Wants.ANONYMOUS if source is Source.NONE else Wants.IDENTITY
        #: What the application is told.
        self.status = AuthStatus(
            AuthState.ANONYMOUS if source is Source.NONE else AuthState.REFRESHING
        )
        #: The stored session in use (store sources).
        self.session: StoredSession | None = None
        #: A session was loaded since the last reauthenticate: an empty store now means the
        #: session was signed out elsewhere, not "never signed in".
        self.had_session = False
        #: The connection holds a confirmed identity, ending at ``held_expires_at`` (ms).
        self.holds_identity = False
        self.held_expires_at: int | None = None
        #: ``(exp ms, serverTime ms, local seconds)`` of the identity held, for the timer.
        self._timing: tuple[int, int, float] | None = None
        #: ``exp`` named by the last ``auth_expiring``.
        self._expiring: int | None = None
        #: Whether new subscriptions and mutations may flow. It follows the identity when
        #: the session's state changes (confirmed, ended, expired, revoked) and on
        #: :meth:`recheck_gate`; a passing failure leaves it as it was.
        self.gate_open = source is Source.NONE
        self._step = _Step.IDLE
        self._force = False
        self._pending: StoredSession | None = None
        self._confirming: Identity | None = None
        self._end_reason = ""
        self._adopt_connected = False

    # ------------------------------------------------------------------ state

    @property
    def state(self) -> SessionState:
        if self.wants is Wants.ANONYMOUS:
            return SessionState.ANONYMOUS
        if self.wants is Wants.SIGNED_OUT:
            return SessionState.SIGNED_OUT
        return SessionState.AUTHENTICATED if self.holds_identity else SessionState.SETTLING

    @property
    def busy(self) -> bool:
        """An operation is under way."""
        return self._step is not _Step.IDLE

    def _move(self, trigger: Trigger) -> None:
        try:
            self.wants = TRANSITIONS[self.wants][trigger]
        except KeyError:
            raise RuntimeError(f"{trigger.value} is not possible in {self.wants.value}") from None

    def recheck_gate(self) -> bool:
        """Set :attr:`gate_open` from the identity now: open unless an expected identity is
        missing. Returns it."""
        self.gate_open = not (self.wants is Wants.IDENTITY and not self.holds_identity)
        return self.gate_open

    def validate(self) -> None:
        """Raise ``AssertionError`` if the state breaks an invariant (for tests)."""
        status = self.status
        if self.source is Source.NONE:
            assert self.wants is Wants.ANONYMOUS, self.wants
        if self.session is not None:
            assert self.source is Source.STORE, "a stored session without a store"
        if self.wants is Wants.SIGNED_OUT:
            assert status.state is AuthState.SIGNED_OUT, status
            assert self.session is None and self._timing is None
        if self._timing is not None or self.held_expires_at is not None:
            assert self.holds_identity, "a deadline for an identity not held"
        if status.state is AuthState.AUTHENTICATED:
            assert status.user_id is not None and status.session_id is not None
        if status.state is AuthState.SIGNED_OUT:
            assert status.reason is not None
        if not self.busy:
            assert self._pending is None and self._confirming is None, "idle with a pending step"
            if self.wants is Wants.ANONYMOUS:
                assert status.state in (AuthState.ANONYMOUS, AuthState.AUTHENTICATED), status

    # ------------------------------------------------------------------ events

    def observe(
        self, event: AuthOk | AuthFailed | AuthExpiring | AuthExpired | SessionRevoked, now: float
    ) -> ForgetSession | None:
        """An auth event from :meth:`ClientCore.receive <tether.client.core.ClientCore.receive>`
        at ``now``. After ``session_revoked``, a :class:`ForgetSession` the shell runs in the
        background (nothing waits for it)."""
        if isinstance(event, AuthOk):
            # The operation that asked for it reports the identity (answered), once the
            # tokens it brought are saved.
            if event.identity is None:
                self._release()
            else:
                self.holds_identity = True
                self.held_expires_at = event.expires_at
                self._timing = (
                    (event.expires_at, event.server_time, now)
                    if event.expires_at is not None
                    else None
                )
        elif isinstance(event, AuthFailed):
            if event.code not in IDENTITY_KEEPING_AUTH_CODES:
                self._release()  # "the connection is now anonymous"
            # unavailable/rate_limited: the server kept the identity (contract 1.1 §5 rule 2)
        elif isinstance(event, AuthExpiring):
            self._expiring = event.expires_at
        elif isinstance(event, AuthExpired):
            self._release()
            if self.wants is Wants.IDENTITY:
                self.status = self._refreshing(AuthErrorCode.TOKEN_EXPIRED)
            self.recheck_gate()
        else:
            self._release()
            forget = None
            if self.wants is Wants.IDENTITY or self.status.state is AuthState.AUTHENTICATED:
                if self.session is not None and self.source is Source.STORE:
                    forget = ForgetSession(self.session)
                self._end(event.reason)
            self.recheck_gate()
            return forget
        return None

    def connection_lost(self) -> None:
        """The socket is gone, and the identity the connection held with it."""
        self._release()

    def _release(self) -> None:
        self.holds_identity = False
        self.held_expires_at = None
        self._timing = None

    # ------------------------------------------------------------------ renewal

    def renewal_deadline(self) -> float | None:
        """When (local wall clock) the identity held must be renewed, if a push is missed."""
        if self._timing is None:
            return None
        expires_at, server_time, received_at = self._timing
        return renewal_due(expires_at, server_time, received_at, self.renewal_margin)

    def renewal_due(self, now: float) -> bool:
        """Must the identity be renewed (or settled) at ``now``?"""
        if self.wants is not Wants.IDENTITY:
            return False
        if not self.holds_identity:
            return True
        if self._expiring is not None and self._expiring == self.held_expires_at:
            return True
        due = self.renewal_deadline()
        return due is not None and now >= due

    def retry_delay(self, backoff: float, now: float) -> float:
        """How long to wait before retrying a renewal that failed for a passing reason, given
        the backoff's ``backoff``: never so long that the identity held ends first (at most
        half the time left before its ``exp``, but not under :data:`MIN_RENEWAL_RETRY`)."""
        if not self.holds_identity or self._timing is None:
            return backoff
        expires_at, server_time, received_at = self._timing
        left = expires_at / 1000 - (server_time / 1000 - received_at) - now
        return min(backoff, max(left / 2, MIN_RENEWAL_RETRY))

    def keep_alive(self, now: float) -> Renew | ScheduleWake:
        """What the keep-alive does at ``now``: renew, or sleep until the deadline (or until
        an event wakes it)."""
        if self.renewal_due(now):
            return Renew()
        return ScheduleWake(self.renewal_deadline())

    def access_fresh(self, session: StoredSession, now: float) -> bool:
        """Is ``session``'s access token good for use at ``now``?"""
        return session.access_fresh(now, self.renewal_margin)

    # ------------------------------------------------------------------ operations

    def begin(self, *, renew: bool, now: float) -> Command:
        """Start an operation: settle the identity on a new connection (``renew=False``), or
        renew it (``renew=True``; :class:`Settled` if another operation renewed already)."""
        self._reset()
        if self.wants is not Wants.IDENTITY:
            return Settled()
        if renew and not self.renewal_due(now):
            return Settled()
        if self.source is Source.FETCH:
            return self._fetch(force=renew)
        if renew:
            return self._refresh_in_band()
        self._step = _Step.LOAD
        return LoadSession()

    def abandon(self) -> None:
        """The operation stopped without an end (its connection was lost, it was cancelled,
        or the shell failed): the next one starts afresh."""
        self._reset()

    def failed(self, reason: str) -> Retry:
        """The operation failed unexpectedly (a store that cannot be written, a bug): report
        it as passing; never a sign-out."""
        if self._step is _Step.SAVE_THEN_SETTLE:
            # The rotated tokens could not be saved: the store still holds the previous
            # refresh token and its retryKey, which yield this same pair again (§2 rule 2).
            # Renew again after the backoff, not at the new identity's distant deadline.
            self._timing = None
            self._expiring = self.held_expires_at
        self._reset()
        return self._retry(reason)

    def fetched(self, token: str | None) -> Command:
        """``fetch_token`` returned ``token`` (``None``: no user)."""
        self._expect(_Step.FETCH)
        if token is None:
            self._move(Trigger.NO_SESSION)
            if self.holds_identity:
                self._step = _Step.ANONYMIZE
                return SendAuthenticate(None)
            return self._settle_anonymous()
        self._step = _Step.PRESENT_FETCHED
        return SendAuthenticate(token)

    def fetch_failed(self) -> Retry:
        """``fetch_token`` raised."""
        self._expect(_Step.FETCH)
        self._reset()
        return self._retry("fetch_token_failed")

    def loaded(self, stored: StoredSession | None, now: float) -> Command:
        """The store held ``stored`` at ``now``."""
        self._expect(_Step.LOAD, _Step.SAVE_SIGNED_IN)
        if stored is None and self.can_sign_in and not self.had_session:
            self._step = _Step.SIGN_IN
            return SignIn()
        if stored is None:
            if self.had_session:
                return self._end_settled(SessionEndReason.SIGNED_OUT)
            self._move(Trigger.NO_SESSION)
            return self._settle_anonymous()
        self.session = stored
        self.had_session = True
        if self.access_fresh(stored, now):
            self._step = _Step.PRESENT_STORED
            return SendAuthenticate(stored.access_token)
        return self._refresh_in_band()

    def signed_in(self, session: StoredSession) -> SaveSession:
        """The HTTP sign-in gave ``session``: saved first, then used."""
        self._expect(_Step.SIGN_IN)
        self._step = _Step.SAVE_SIGNED_IN
        self._pending = session
        return SaveSession(session)

    def sign_in_failed(self, code: str) -> Command:
        """The HTTP sign-in failed with ``code``."""
        self._expect(_Step.SIGN_IN)
        if classify_auth_code(code) is AuthErrorKind.RETRY:
            self._reset()
            return self._retry(code)
        return self._end_settled(code)

    def refresh_loaded(self, stored: StoredSession | None, now: float) -> Command:
        """Under the store's lock, the store held ``stored`` at ``now``."""
        self._expect(_Step.REFRESH_LOAD)
        if stored is None:  # signed out by another user of the store
            return self._end_settled(SessionEndReason.SIGNED_OUT)
        known = self.session.refresh_token if self.session is not None else None
        if stored.refresh_token != known and self.access_fresh(stored, now):
            # Another process rotated already: use its tokens, spend nothing.
            self.session = stored
            self._step = _Step.PRESENT_ROTATED
            return SendAuthenticate(stored.access_token)
        return self._spend(stored)

    def lock_timed_out(self) -> Retry:
        """The store's lock could not be taken in time."""
        self._expect(_Step.REFRESH_LOAD)
        self._reset()
        return self._retry("store_locked")

    def saved(self, now: float) -> Command:
        """The :class:`SaveSession` or :class:`ForgetSession` asked for is done, at ``now``."""
        step, pending = self._step, self._pending
        self._pending = None
        if step is _Step.SAVE_SIGNED_IN:
            assert pending is not None
            self._step = _Step.LOAD
            return self.loaded(pending, now)
        if step is _Step.SAVE_RETRY_KEY:
            assert self.session is not None and self.session.retry_key is not None
            self._step = _Step.REFRESH
            return SendRefresh(self.session.refresh_token, self.session.retry_key)
        if step is _Step.SAVE_THEN_SETTLE:
            assert self._confirming is not None
            self._confirm(self._confirming)
            return self._settled()
        if step in (_Step.SAVE_THEN_END, _Step.FORGET_THEN_END):
            return self._end_settled(self._end_reason)
        if step is _Step.ADOPT_SAVE:
            assert pending is not None
            self.session = pending
            self._move(Trigger.EXPECT)
            self.had_session = True
            if self._adopt_connected:
                self._step = _Step.ADOPT_PRESENT
                return SendAuthenticate(pending.access_token)
            self.status = AuthStatus(AuthState.REFRESHING, pending.user_id, pending.session_id)
            return self._settled()
        raise RuntimeError(f"nothing was being saved ({step.value})")

    def answered(self, answer: AuthOk | AuthFailed, now: float) -> Command:
        """The answer to the :class:`SendAuthenticate` or :class:`SendRefresh` asked for,
        received at ``now`` (already passed to :meth:`observe`)."""
        step = self._step
        if step is _Step.ANONYMIZE:
            return self._settle_anonymous()
        if isinstance(answer, AuthOk):
            if answer.identity is None:
                # A token answered with no identity: the server says we are anonymous.
                self._move(Trigger.NO_SESSION)
                self.recheck_gate()
                return self._settle_anonymous()
            if step is _Step.REFRESH and answer.tokens is not None:
                fresh = StoredSession.from_tokens(
                    answer.tokens,
                    received_at=now,
                    user_id=answer.identity.user_id,
                    session_id=answer.identity.session_id,
                    server_time=answer.server_time,
                )
                self.session = fresh
                self._step, self._confirming = _Step.SAVE_THEN_SETTLE, answer.identity
                return SaveSession(fresh)  # saved before it is ever used
            self._confirm(answer.identity)
            return self._settled()
        code = answer.code
        kind = classify_auth_code(code)
        if step is _Step.ADOPT_PRESENT:
            session = self.session
            assert session is not None
            self.status = AuthStatus(
                AuthState.REFRESHING, session.user_id, session.session_id, code
            )
            self._reset()
            return Retry(code)
        if kind is AuthErrorKind.RETRY:
            self._reset()
            return self._retry(code)
        if step is _Step.PRESENT_FETCHED:
            if kind is AuthErrorKind.RENEW and not self._force:
                return self._fetch(force=True)
            return self._end_settled(code)
        if step is _Step.PRESENT_STORED:
            if kind is AuthErrorKind.SIGNED_OUT:
                assert self.session is not None
                self._step, self._end_reason = _Step.FORGET_THEN_END, code
                return ForgetSession(self.session)
            return self._refresh_in_band()  # expired or invalid: the refresh token may do
        if step is _Step.PRESENT_ROTATED:
            if kind is AuthErrorKind.SIGNED_OUT:
                self._step, self._end_reason = _Step.SAVE_THEN_END, code
                return SaveSession(None)  # under the store's lock already
            assert self.session is not None
            return self._spend(self.session)
        if step is _Step.REFRESH:
            self._step, self._end_reason = _Step.SAVE_THEN_END, code
            return SaveSession(None)
        raise RuntimeError(f"no answer was awaited ({step.value})")

    # ------------------------------------------------------------------ the application

    def reauthenticate(self) -> None:
        """Take the identity from the source again (ends ``SIGNED_OUT``); then
        :meth:`begin`."""
        if self.source is Source.NONE:
            raise RuntimeError("this client has no auth source")
        self._move(Trigger.EXPECT)
        self.had_session = False

    def adopt(self, session: StoredSession, *, connected: bool) -> SaveSession:
        """Use ``session`` (from a sign-in or sign-up): saved, then presented if
        ``connected``."""
        if self.source is Source.FETCH:
            raise RuntimeError("this client takes its tokens from fetch_token")
        self.source = Source.STORE
        self._reset()
        self._step = _Step.ADOPT_SAVE
        self._pending = session
        self._adopt_connected = connected
        return SaveSession(session)

    def before_sign_out(self, stored: StoredSession, now: float) -> RefreshOverHTTP | None:
        """Signing out proves the session with its access token: renew a stale one first."""
        return None if self.access_fresh(stored, now) else RefreshOverHTTP(stored)

    def signed_out(self) -> None:
        """The application signed out (the store is cleared)."""
        self._end(SessionEndReason.SIGNED_OUT)

    # ------------------------------------------------------------------ helpers

    def _fetch(self, *, force: bool) -> CallFetchToken:
        self._step, self._force = _Step.FETCH, force
        return CallFetchToken(force)

    def _refresh_in_band(self) -> RefreshInBand:
        self._step = _Step.REFRESH_LOAD
        return RefreshInBand()

    def _spend(self, stored: StoredSession) -> Command:
        if stored.retry_key is None:
            # Saved before the token is spent: a retry, in this process or another, sends
            # the same key and gets the same answer if the first one was lost.
            self.session = stored.with_retry_key(self._make_retry_key())
            self._step = _Step.SAVE_RETRY_KEY
            return SaveSession(self.session)
        self.session = stored
        self._step = _Step.REFRESH
        return SendRefresh(stored.refresh_token, stored.retry_key)

    def _confirm(self, identity: Identity) -> None:
        self._move(Trigger.CONFIRMED)
        self.status = AuthStatus(AuthState.AUTHENTICATED, identity.user_id, identity.session_id)
        self.recheck_gate()

    def _expect(self, *steps: _Step) -> None:
        if self._step not in steps:
            raise RuntimeError(f"unexpected result in step {self._step.value}")

    def _reset(self) -> None:
        self._step = _Step.IDLE
        self._pending = None
        self._confirming = None
        self._force = False
        self._end_reason = ""

    def _settled(self) -> Settled:
        self._reset()
        return Settled()

    def _settle_anonymous(self) -> Settled:
        if self.wants is not Wants.SIGNED_OUT:  # a signed-out client keeps saying why
            self.status = AuthStatus(AuthState.ANONYMOUS)
        return self._settled()

    def _retry(self, reason: str) -> Retry:
        status = self.status
        if self.holds_identity and status.state is AuthState.AUTHENTICATED:
            # The connection still holds the identity (rule 2): report the failed renewal
            # without pretending the user is gone.
            self.status = AuthStatus(
                AuthState.AUTHENTICATED, status.user_id, status.session_id, reason
            )
        else:
            self.status = self._refreshing(reason)
        return Retry(reason)

    def _end_settled(self, reason: str) -> Settled:
        self._end(reason)
        return self._settled()

    def _end(self, reason: str) -> None:
        """The session is over: tell the application; continue as anonymous."""
        self._move(Trigger.ENDED)
        self.session = None
        self._timing = None
        self.status = AuthStatus(AuthState.SIGNED_OUT, reason=reason)
        self.recheck_gate()

    def _refreshing(self, reason: str | None) -> AuthStatus:
        session = self.session
        return AuthStatus(
            AuthState.REFRESHING,
            session.user_id if session else self.status.user_id,
            session.session_id if session else self.status.session_id,
            reason,
        )


__all__ = [
    "MIN_RENEWAL_RETRY",
    "TRANSITIONS",
    "AuthCore",
    "CallFetchToken",
    "Command",
    "ForgetSession",
    "LoadSession",
    "RefreshInBand",
    "RefreshOverHTTP",
    "Renew",
    "Retry",
    "SaveSession",
    "ScheduleWake",
    "SendAuthenticate",
    "SendRefresh",
    "SessionState",
    "Settled",
    "SignIn",
    "Source",
    "Trigger",
    "Wants",
]
