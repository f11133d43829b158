"""The client's session keeping (:mod:`tether.client.auth`), without a socket, a store, HTTP
or a sleep: each test feeds the core events and a fake clock, performs its commands by hand,
and checks its invariants after every step."""

from __future__ import annotations

import random
from typing import Any

import pytest
from tether.client.auth import (
    MIN_RENEWAL_RETRY,
    TRANSITIONS,
    AuthCore,
    CallFetchToken,
    Command,
    ForgetSession,
    LoadSession,
    RefreshInBand,
    RefreshOverHTTP,
    Renew,
    Retry,
    SaveSession,
    ScheduleWake,
    SendAuthenticate,
    SendRefresh,
    SessionState,
    Settled,
    SignIn,
    Source,
    Trigger,
    Wants,
)
from tether.client.core import (
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
from tether.client.token_store import StoredSession

pytestmark = pytest.mark.timeout(30)

NOW = 1_000_000.0  # local wall clock, seconds
LIFETIME_MS = 900_000  # a 15-minute access token
USER = Identity("u1", "s1")


class Clock:
    """A wall clock the test moves."""

    def __init__(self) -> None:
        self.now = NOW

    def ms(self) -> int:
        return int(self.now * 1000)


def session(
    clock: Clock, *, refresh: str = "rt1", access: str = "at1", age: float = 0.0
) -> StoredSession:
    """A session issued ``age`` seconds ago (server and local clocks agree)."""
    issued_ms = int((clock.now - age) * 1000)
    return StoredSession(
        USER.user_id,
        USER.session_id,
        access_token=access,
        refresh_token=refresh,
        expires_at=issued_ms + LIFETIME_MS,
        server_time=issued_ms,
        received_at=clock.now - age,
    )


def ok(clock: Clock, version: int = 1, *, tokens: dict[str, Any] | None = None) -> AuthOk:
    return AuthOk(version, USER, clock.ms() + LIFETIME_MS, clock.ms(), tokens)


def failed(code: str, version: int = 1) -> AuthFailed:
    return AuthFailed(version, code, "")


def answer(core: AuthCore, event: AuthOk | AuthFailed, clock: Clock) -> Command:
    """The server's answer, as the shell hands it over: observed, then answered."""
    core.observe(event, clock.now)
    core.validate()
    command = core.answered(event, clock.now)
    core.validate()
    return command


def store_core(**kwargs: Any) -> AuthCore:
    core = AuthCore(Source.STORE, make_retry_key=lambda: "key1", **kwargs)
    core.validate()
    return core


def settle_with_stored(core: AuthCore, clock: Clock, stored: StoredSession) -> None:
    """Settle a new connection with a fresh stored session."""
    assert core.begin(renew=False, now=clock.now) == LoadSession()
    assert core.loaded(stored, clock.now) == SendAuthenticate(stored.access_token)
    assert answer(core, ok(clock), clock) == Settled()


# ---------------------------------------------------------------------------------- states


def test_every_trigger_is_decided_in_every_state_it_can_meet() -> None:
    assert set(TRANSITIONS) == set(Wants)
    for row in TRANSITIONS.values():
        # Every trigger can meet every state: an operation that began in one state may be
        # answered after an event moved the client to another (session_revoked mid-renewal).
        assert set(row) == set(Trigger)
        assert row[Trigger.ENDED] is Wants.SIGNED_OUT
        assert row[Trigger.EXPECT] is Wants.IDENTITY
    # A signed-out client that learns its source has no session stays signed out.
    assert TRANSITIONS[Wants.SIGNED_OUT][Trigger.NO_SESSION] is Wants.SIGNED_OUT


@pytest.mark.parametrize(
    ("source", "state", "status"),
    [
        (Source.NONE, SessionState.ANONYMOUS, AuthState.ANONYMOUS),
        (Source.STORE, SessionState.SETTLING, AuthState.REFRESHING),
        (Source.FETCH, SessionState.SETTLING, AuthState.REFRESHING),
    ],
)
def test_initial_state_follows_the_source(
    source: Source, state: SessionState, status: AuthState
) -> None:
    core = AuthCore(source)
    core.validate()
    assert core.state is state
    assert core.status == AuthStatus(status)
    assert core.begin(renew=False, now=NOW) == (
        Settled()
        if source is Source.NONE
        else LoadSession()
        if source is Source.STORE
        else CallFetchToken(False)
    )


def test_the_validator_catches_a_broken_invariant() -> None:
    core = store_core()
    core.wants = Wants.SIGNED_OUT  # without ending the session: status still REFRESHING
    with pytest.raises(AssertionError):
        core.validate()


# ---------------------------------------------------------------------------------- stored sessions


def test_a_fresh_stored_access_token_is_presented_and_confirms_the_identity() -> None:
    clock, core = Clock(), store_core()
    stored = session(clock)
    assert core.begin(renew=False, now=clock.now) == LoadSession()
    assert core.loaded(stored, clock.now) == SendAuthenticate("at1")
    assert core.state is SessionState.SETTLING and not core.recheck_gate()
    assert answer(core, ok(clock), clock) == Settled()
    assert core.state is SessionState.AUTHENTICATED
    assert core.status == AuthStatus(AuthState.AUTHENTICATED, "u1", "s1")
    assert core.gate_open


def test_a_stale_access_token_is_not_presented_the_refresh_token_is_spent_once_saved() -> None:
    clock, core = Clock(), store_core()
    stale = session(clock, age=LIFETIME_MS / 1000)  # expired
    assert core.begin(renew=False, now=clock.now) == LoadSession()
    assert core.loaded(stale, clock.now) == RefreshInBand()
    # Under the store's lock: a retryKey is saved before the token is spent.
    with_key = stale.with_retry_key("key1")
    assert core.refresh_loaded(stale, clock.now) == SaveSession(with_key)
    assert core.saved(clock.now) == SendRefresh("rt1", "key1")
    tokens = {"accessToken": "at2", "refreshToken": "rt2", "expiresAt": clock.ms() + 1000}
    command = answer(core, ok(clock, tokens=tokens), clock)
    assert isinstance(command, SaveSession) and command.session is not None
    assert (command.session.access_token, command.session.refresh_token) == ("at2", "rt2")
    assert command.session.retry_key is None
    # Confirmed only once the new tokens are saved.
    assert core.status.state is AuthState.REFRESHING
    assert core.saved(clock.now) == Settled()
    core.validate()
    assert core.status == AuthStatus(AuthState.AUTHENTICATED, "u1", "s1")
    assert core.session == command.session


def test_rotated_tokens_that_cannot_be_saved_are_renewed_again_after_the_backoff() -> None:
    # The store still holds the previous refresh token and its retryKey, which yield the same
    # pair again: the keep-alive must not sleep until the new identity's distant deadline.
    clock, core = Clock(), store_core()
    settle_with_stored(core, clock, session(clock))
    clock.now += LIFETIME_MS / 1000 - 20  # past the renewal margin
    assert core.keep_alive(clock.now) == Renew()
    assert core.begin(renew=True, now=clock.now) == RefreshInBand()
    stored = session(clock, age=LIFETIME_MS / 1000 - 20)
    assert core.refresh_loaded(stored, clock.now) == SaveSession(stored.with_retry_key("key1"))
    assert core.saved(clock.now) == SendRefresh("rt1", "key1")
    tokens = {"accessToken": "at2", "refreshToken": "rt2", "expiresAt": clock.ms() + LIFETIME_MS}
    assert isinstance(answer(core, ok(clock, 2, tokens=tokens), clock), SaveSession)
    assert core.failed("error: OSError") == Retry("error: OSError")  # the save raised
    core.validate()
    assert core.keep_alive(clock.now + 1) == Renew()


def test_a_retry_key_already_stored_is_sent_again_not_replaced() -> None:
    clock, core = Clock(), store_core()
    stale = session(clock, age=LIFETIME_MS / 1000).with_retry_key("earlier")
    core.begin(renew=False, now=clock.now)
    assert core.loaded(stale, clock.now) == RefreshInBand()
    assert core.refresh_loaded(stale, clock.now) == SendRefresh("rt1", "earlier")


@pytest.mark.parametrize("code", ["token_expired", "invalid_token"])
def test_a_refused_access_token_falls_back_to_the_refresh_token(code: str) -> None:
    clock, core = Clock(), store_core()
    core.begin(renew=False, now=clock.now)
    core.loaded(session(clock), clock.now)
    assert answer(core, failed(code), clock) == RefreshInBand()
    assert core.status.state is AuthState.REFRESHING


def test_another_process_rotated_already_its_access_token_is_used_nothing_spent() -> None:
    clock, core = Clock(), store_core()
    stored = session(clock)
    settle_with_stored(core, clock, stored)
    clock.now += LIFETIME_MS / 1000 - 10  # past the renewal deadline
    assert core.begin(renew=True, now=clock.now) == RefreshInBand()
    theirs = session(clock, refresh="rt2", access="at2")
    assert core.refresh_loaded(theirs, clock.now) == SendAuthenticate("at2")
    assert answer(core, ok(clock, 2), clock) == Settled()
    assert core.session == theirs


def test_the_rotated_token_refused_as_expired_is_refreshed_with_the_stored_refresh_token() -> None:
    clock, core = Clock(), store_core()
    settle_with_stored(core, clock, session(clock))
    clock.now += LIFETIME_MS / 1000 - 10
    core.begin(renew=True, now=clock.now)
    theirs = session(clock, refresh="rt2", access="at2")
    core.refresh_loaded(theirs, clock.now)
    assert answer(core, failed("token_expired", 2), clock) == SaveSession(
        theirs.with_retry_key("key1")
    )
    assert core.saved(clock.now) == SendRefresh("rt2", "key1")


@pytest.mark.parametrize("code", ["unavailable", "rate_limited", "some_future_code"])
@pytest.mark.parametrize("where", ["present", "refresh", "fetch", "sign_in"])
def test_passing_failures_are_retried_never_a_sign_out(code: str, where: str) -> None:
    clock = Clock()
    if where == "fetch":
        core = AuthCore(Source.FETCH)
        assert core.begin(renew=False, now=clock.now) == CallFetchToken(False)
        assert core.fetched("tok") == SendAuthenticate("tok")
        command = answer(core, failed(code), clock)
    elif where == "sign_in":
        core = store_core(can_sign_in=True)
        core.begin(renew=False, now=clock.now)
        assert core.loaded(None, clock.now) == SignIn()
        command = core.sign_in_failed(code)
    else:
        core = store_core()
        core.begin(renew=False, now=clock.now)
        stored = session(clock, age=0 if where == "present" else LIFETIME_MS / 1000)
        stored = stored.with_retry_key("k")
        first = core.loaded(stored, clock.now)
        if where == "refresh":
            assert first == RefreshInBand()
            assert core.refresh_loaded(stored, clock.now) == SendRefresh("rt1", "k")
        command = answer(core, failed(code), clock)
    core.validate()
    assert command == Retry(code)
    assert core.status.state is AuthState.REFRESHING and core.status.reason == code
    assert core.wants is Wants.IDENTITY and core.renewal_due(clock.now)
    if where in ("present", "refresh"):
        assert core.session is not None  # the tokens are kept for the retry


@pytest.mark.parametrize("code", ["refresh_invalid", "refresh_reused", "session_revoked"])
def test_a_refused_refresh_clears_the_store_then_signs_out(code: str) -> None:
    clock, core = Clock(), store_core()
    core.begin(renew=False, now=clock.now)
    stale = session(clock, age=LIFETIME_MS / 1000).with_retry_key("k")
    core.loaded(stale, clock.now)
    core.refresh_loaded(stale, clock.now)
    assert answer(core, failed(code), clock) == SaveSession(None)
    assert core.status.state is AuthState.REFRESHING  # not before the store is cleared
    assert core.saved(clock.now) == Settled()
    core.validate()
    assert core.status == AuthStatus(AuthState.SIGNED_OUT, reason=code)
    assert core.state is SessionState.SIGNED_OUT and core.gate_open
    assert not core.renewal_due(clock.now + 10**6)
    assert core.begin(renew=False, now=clock.now) == Settled()  # until the app signs in


def test_a_stored_access_token_of_a_revoked_session_forgets_that_session() -> None:
    clock, core = Clock(), store_core()
    stored = session(clock)
    core.begin(renew=False, now=clock.now)
    core.loaded(stored, clock.now)
    assert answer(core, failed("session_revoked"), clock) == ForgetSession(stored)
    assert core.saved(clock.now) == Settled()
    assert core.status == AuthStatus(AuthState.SIGNED_OUT, reason="session_revoked")


def test_the_store_lock_timing_out_is_a_passing_failure() -> None:
    clock, core = Clock(), store_core()
    settle_with_stored(core, clock, session(clock))
    clock.now += LIFETIME_MS / 1000
    assert core.begin(renew=True, now=clock.now) == RefreshInBand()
    assert core.lock_timed_out() == Retry("store_locked")
    # The connection still holds the identity: still authenticated, with the reason.
    assert core.status == AuthStatus(AuthState.AUTHENTICATED, "u1", "s1", "store_locked")


def test_an_empty_store_signs_in_with_the_password_then_saves_before_use() -> None:
    clock, core = Clock(), store_core(can_sign_in=True)
    core.begin(renew=False, now=clock.now)
    assert core.loaded(None, clock.now) == SignIn()
    fresh = session(clock)
    assert core.signed_in(fresh) == SaveSession(fresh)
    assert core.saved(clock.now) == SendAuthenticate("at1")
    assert answer(core, ok(clock), clock) == Settled()
    assert core.status.state is AuthState.AUTHENTICATED


def test_wrong_credentials_sign_out_without_retrying() -> None:
    clock, core = Clock(), store_core(can_sign_in=True)
    core.begin(renew=False, now=clock.now)
    core.loaded(None, clock.now)
    assert core.sign_in_failed("invalid_credentials") == Settled()
    assert core.status == AuthStatus(AuthState.SIGNED_OUT, reason="invalid_credentials")


def test_an_emptied_store_means_signed_out_a_never_filled_one_anonymous() -> None:
    clock = Clock()
    never = store_core()
    never.begin(renew=False, now=clock.now)
    assert never.loaded(None, clock.now) == Settled()
    assert never.status == AuthStatus(AuthState.ANONYMOUS) and never.gate_open is False
    assert never.recheck_gate()  # anonymous: nothing to wait for
    # With a password, a session once loaded is not signed in again behind the user's back.
    had = store_core(can_sign_in=True)
    settle_with_stored(had, clock, session(clock))
    had.connection_lost()
    assert had.begin(renew=False, now=clock.now) == LoadSession()
    assert had.loaded(None, clock.now) == Settled()
    assert had.status == AuthStatus(AuthState.SIGNED_OUT, reason="signed_out")


# ---------------------------------------------------------------------------------- fetch_token


def test_fetch_token_is_forced_once_for_an_expired_token_then_the_session_ends() -> None:
    clock, core = Clock(), AuthCore(Source.FETCH)
    assert core.begin(renew=False, now=clock.now) == CallFetchToken(False)
    assert core.fetched("old") == SendAuthenticate("old")
    assert answer(core, failed("token_expired"), clock) == CallFetchToken(True)
    assert core.fetched("still-old") == SendAuthenticate("still-old")
    assert answer(core, failed("token_expired", 2), clock) == Settled()
    assert core.status == AuthStatus(AuthState.SIGNED_OUT, reason="token_expired")


def test_a_renewal_asks_fetch_token_for_a_new_token() -> None:
    clock, core = Clock(), AuthCore(Source.FETCH)
    core.begin(renew=False, now=clock.now)
    core.fetched("t1")
    answer(core, ok(clock), clock)
    core.observe(AuthExpiring(clock.ms() + LIFETIME_MS, clock.ms()), clock.now)
    assert core.begin(renew=True, now=clock.now) == CallFetchToken(True)
    assert core.fetch_failed() == Retry("fetch_token_failed")
    assert core.status == AuthStatus(AuthState.AUTHENTICATED, "u1", "s1", "fetch_token_failed")


def test_fetch_token_without_a_user_drops_the_identity_held() -> None:
    clock, core = Clock(), AuthCore(Source.FETCH)
    core.begin(renew=False, now=clock.now)
    core.fetched("t1")
    answer(core, ok(clock), clock)
    core.reauthenticate()
    assert core.begin(renew=False, now=clock.now) == CallFetchToken(False)
    assert core.fetched(None) == SendAuthenticate(None)
    core.observe(AuthOk(2, None, None, clock.ms(), None), clock.now)
    assert core.answered(AuthOk(2, None, None, clock.ms(), None), clock.now) == Settled()
    core.validate()
    assert core.status == AuthStatus(AuthState.ANONYMOUS)
    assert core.state is SessionState.ANONYMOUS and not core.holds_identity


def test_fetch_token_without_a_user_after_session_revoked_stays_signed_out() -> None:
    # A renewal awaits fetch_token when session_revoked arrives; the application, told it was
    # signed out, answers None. The client is signed out, not stuck mid-renewal.
    clock, core = Clock(), AuthCore(Source.FETCH)
    core.begin(renew=False, now=clock.now)
    core.fetched("t1")
    answer(core, ok(clock), clock)
    core.observe(AuthExpiring(clock.ms() + LIFETIME_MS, clock.ms()), clock.now)
    assert core.begin(renew=True, now=clock.now) == CallFetchToken(True)
    core.observe(SessionRevoked("signed_out"), clock.now)
    assert core.fetched(None) == Settled()
    core.validate()
    assert core.status == AuthStatus(AuthState.SIGNED_OUT, reason="signed_out")
    assert core.state is SessionState.SIGNED_OUT


# ---------------------------------------------------------------------------------- renewal


def test_the_timer_renews_at_the_deadline_when_no_push_comes() -> None:
    clock, core = Clock(), store_core()
    settle_with_stored(core, clock, session(clock))
    expires_at = clock.ms() + LIFETIME_MS
    due = renewal_due(expires_at, clock.ms(), clock.now)
    assert core.keep_alive(clock.now) == ScheduleWake(due)
    assert due == pytest.approx(clock.now + LIFETIME_MS / 1000 - 30)
    clock.now = due - 0.001
    assert not core.renewal_due(clock.now)
    assert core.begin(renew=True, now=clock.now) == Settled()  # renewed meanwhile: nothing
    clock.now = due
    assert core.keep_alive(clock.now) == Renew()
    assert core.begin(renew=True, now=clock.now) == RefreshInBand()


def test_auth_expiring_for_the_identity_held_renews_at_once() -> None:
    clock, core = Clock(), store_core()
    settle_with_stored(core, clock, session(clock))
    held = core.held_expires_at
    assert held is not None
    core.observe(AuthExpiring(held - 1, clock.ms()), clock.now)  # about an older identity
    assert not core.renewal_due(clock.now)
    core.observe(AuthExpiring(held, clock.ms()), clock.now)
    assert core.keep_alive(clock.now) == Renew()
    core.validate()


def test_the_deadline_moves_with_the_server_clock_skew() -> None:
    clock, core = Clock(), AuthCore(Source.FETCH, renewal_margin=30)
    core.begin(renew=False, now=clock.now)
    core.fetched("t")
    skew_ms = 3_600_000  # the server is an hour ahead
    server_now = clock.ms() + skew_ms
    answer(core, AuthOk(1, USER, server_now + LIFETIME_MS, server_now, None), clock)
    assert core.renewal_deadline() == pytest.approx(clock.now + LIFETIME_MS / 1000 - 30)


def test_auth_expired_reports_refreshing_closes_the_gate_and_renews() -> None:
    clock, core = Clock(), store_core()
    settle_with_stored(core, clock, session(clock))
    assert core.gate_open
    core.observe(AuthExpired(clock.ms(), clock.ms()), clock.now)
    core.validate()
    assert core.status == AuthStatus(AuthState.REFRESHING, "u1", "s1", "token_expired")
    assert not core.gate_open and core.state is SessionState.SETTLING
    assert core.keep_alive(clock.now) == Renew()
    assert core.renewal_deadline() is None


@pytest.mark.parametrize("code", ["unavailable", "rate_limited"])
def test_a_transient_renewal_failure_keeps_the_identity_and_retries_before_exp(code: str) -> None:
    # Contract 1.1 §5 rule 2: the server keeps the identity; so does the client.
    clock, core = Clock(), store_core()
    settle_with_stored(core, clock, session(clock))
    held = core.held_expires_at
    assert held is not None
    core.observe(AuthExpiring(held, clock.ms()), clock.now)
    assert core.begin(renew=True, now=clock.now) == RefreshInBand()
    stale = session(clock).with_retry_key("k")
    core.refresh_loaded(stale, clock.now)  # the file changed under us: spend ours
    assert answer(core, failed(code, 2), clock) == Retry(code)
    assert core.holds_identity and core.held_expires_at == held
    assert core.state is SessionState.AUTHENTICATED and core.gate_open
    assert core.status == AuthStatus(AuthState.AUTHENTICATED, "u1", "s1", code)
    assert core.keep_alive(clock.now) == Renew()  # still due: retried after the backoff
    # ... and the backoff never outlasts the identity: at most half the time left.
    clock.now = held / 1000 - 10
    assert core.retry_delay(16.0, clock.now) == pytest.approx(5.0)
    assert core.retry_delay(0.05, clock.now) == 0.05
    clock.now = held / 1000 + 1  # past exp (the server's leeway): not a busy loop either
    assert core.retry_delay(16.0, clock.now) == MIN_RENEWAL_RETRY
    # A renewal that then succeeds clears the reason.
    assert core.begin(renew=True, now=clock.now) == RefreshInBand()
    core.refresh_loaded(stale, clock.now)
    tokens = {"accessToken": "at2", "refreshToken": "rt2", "expiresAt": clock.ms() + LIFETIME_MS}
    assert isinstance(answer(core, ok(clock, 3, tokens=tokens), clock), SaveSession)
    assert core.saved(clock.now) == Settled()
    assert core.status == AuthStatus(AuthState.AUTHENTICATED, "u1", "s1")


@pytest.mark.parametrize("code", ["token_expired", "invalid_token", "some_future_code"])
def test_other_auth_errors_drop_the_identity_held(code: str) -> None:
    clock, core = Clock(), AuthCore(Source.FETCH)
    core.begin(renew=False, now=clock.now)
    core.fetched("t1")
    answer(core, ok(clock), clock)
    core.observe(failed(code, 2), clock.now)
    assert not core.holds_identity and core.held_expires_at is None
    core.validate()


def test_session_revoked_forgets_the_session_and_signs_out() -> None:
    clock, core = Clock(), store_core()
    stored = session(clock)
    settle_with_stored(core, clock, stored)
    assert core.observe(SessionRevoked("signed_out_everywhere"), clock.now) == ForgetSession(stored)
    core.validate()
    assert core.status == AuthStatus(AuthState.SIGNED_OUT, reason="signed_out_everywhere")
    assert core.keep_alive(clock.now + 10**6) == ScheduleWake(None)
    # Anonymous clients are not told about sessions they never had.
    anonymous = AuthCore(Source.NONE)
    assert anonymous.observe(SessionRevoked("revoked"), clock.now) is None
    assert anonymous.status == AuthStatus(AuthState.ANONYMOUS)


def test_a_lost_connection_keeps_authenticated_and_settles_again() -> None:
    clock, core = Clock(), store_core()
    settle_with_stored(core, clock, session(clock))
    core.connection_lost()
    core.validate()
    # A routine reconnect is invisible to the application.
    assert core.status.state is AuthState.AUTHENTICATED
    assert core.state is SessionState.SETTLING and core.renewal_deadline() is None
    assert core.renewal_due(clock.now)
    assert not core.recheck_gate()  # new work waits for the identity on the next connection


def test_a_passing_renewal_failure_leaves_the_gate_as_it_was() -> None:
    clock, core = Clock(), store_core()
    settle_with_stored(core, clock, session(clock))
    clock.now += LIFETIME_MS / 1000
    core.begin(renew=True, now=clock.now)
    stale = session(clock, age=LIFETIME_MS / 1000).with_retry_key("k")
    core.refresh_loaded(stale, clock.now)
    assert answer(core, failed("unavailable", 2), clock) == Retry("unavailable")
    # Operations keep flowing while the renewal is retried; the gate follows the identity
    # again if it ends meanwhile.
    assert core.gate_open


# ---------------------------------------------------------------------------------- the application


def test_adopting_a_session_saves_it_then_presents_it() -> None:
    clock, core = Clock(), AuthCore(Source.NONE)
    fresh = session(clock)
    assert core.adopt(fresh, connected=True) == SaveSession(fresh)
    assert core.source is Source.STORE
    assert core.saved(clock.now) == SendAuthenticate("at1")
    assert answer(core, failed("unavailable"), clock) == Retry("unavailable")
    assert core.status == AuthStatus(AuthState.REFRESHING, "u1", "s1", "unavailable")
    # While disconnected, the next connection presents it.
    offline = AuthCore(Source.NONE)
    offline.adopt(fresh, connected=False)
    assert offline.saved(clock.now) == Settled()
    offline.validate()
    assert offline.status == AuthStatus(AuthState.REFRESHING, "u1", "s1")
    with pytest.raises(RuntimeError):
        AuthCore(Source.FETCH).adopt(fresh, connected=True)


def test_reauthenticate_ends_signed_out_and_looks_at_the_store_again() -> None:
    clock, core = Clock(), store_core()
    settle_with_stored(core, clock, session(clock))
    core.signed_out()
    assert core.status == AuthStatus(AuthState.SIGNED_OUT, reason="signed_out")
    assert core.begin(renew=False, now=clock.now) == Settled()
    core.reauthenticate()
    assert core.begin(renew=False, now=clock.now) == LoadSession()
    assert core.loaded(None, clock.now) == Settled()  # not "signed out": looked afresh
    assert core.status == AuthStatus(AuthState.ANONYMOUS)
    with pytest.raises(RuntimeError):
        AuthCore(Source.NONE).reauthenticate()


def test_signing_out_renews_a_stale_access_token_over_http_first() -> None:
    clock, core = Clock(), store_core()
    fresh = session(clock)
    assert core.before_sign_out(fresh, clock.now) is None
    stale = session(clock, age=LIFETIME_MS / 1000)
    assert core.before_sign_out(stale, clock.now) == RefreshOverHTTP(stale)


# ---------------------------------------------------------------------------------- random walk


def test_invariants_hold_on_a_random_walk_of_events_and_answers() -> None:
    """Drive the core with random answers, events and clock moves; validate after each."""
    rng = random.Random(1234)
    codes = ["unavailable", "rate_limited", "token_expired", "invalid_token", "refresh_reused"]
    for source in (Source.STORE, Source.FETCH):
        clock = Clock()
        core = AuthCore(source, can_sign_in=source is Source.STORE, make_retry_key=lambda: "k")
        version = 0
        for _ in range(3000):
            clock.now += rng.random() * 60
            roll = rng.random()
            if roll < 0.05:
                core.connection_lost()
            elif roll < 0.08 and core.holds_identity:
                core.observe(AuthExpired(clock.ms(), clock.ms()), clock.now)
            elif roll < 0.09:
                core.observe(SessionRevoked("revoked"), clock.now)
            elif roll < 0.12:
                core.reauthenticate()
            core.validate()
            command: Command = core.begin(renew=rng.random() < 0.5, now=clock.now)
            for _step in range(20):
                core.validate()
                if isinstance(command, Settled | Retry):
                    break
                if isinstance(command, CallFetchToken):
                    pick = rng.random()
                    command = (
                        core.fetch_failed()
                        if pick < 0.1
                        else core.fetched(None if pick < 0.2 else "tok")
                    )
                elif isinstance(command, LoadSession):
                    stored = None if rng.random() < 0.2 else session(clock, age=rng.random() * 900)
                    command = core.loaded(stored, clock.now)
                elif isinstance(command, SignIn):
                    if rng.random() < 0.2:
                        command = core.sign_in_failed(
                            rng.choice(["rate_limited", "invalid_credentials"])
                        )
                    else:
                        command = core.signed_in(session(clock))
                elif isinstance(command, SaveSession | ForgetSession):
                    command = core.saved(clock.now)
                elif isinstance(command, RefreshInBand):
                    if rng.random() < 0.1:
                        command = core.lock_timed_out()
                    else:
                        stored = (
                            None
                            if rng.random() < 0.1
                            else session(
                                clock, refresh=rng.choice(["rt1", "rt2"]), age=rng.random() * 900
                            )
                        )
                        command = core.refresh_loaded(stored, clock.now)
                else:
                    version += 1
                    if rng.random() < 0.6:
                        tokens = None
                        if isinstance(command, SendRefresh):
                            tokens = {"accessToken": "a", "refreshToken": "r", "expiresAt": 0}
                        event: AuthOk | AuthFailed = ok(clock, version, tokens=tokens)
                        if isinstance(command, SendAuthenticate) and command.token is None:
                            event = AuthOk(version, None, None, clock.ms(), None)
                    else:
                        event = failed(rng.choice(codes), version)
                    core.observe(event, clock.now)
                    core.validate()
                    command = core.answered(event, clock.now)
            else:
                raise AssertionError("an operation did not end")
            core.validate()
            assert not core.busy
