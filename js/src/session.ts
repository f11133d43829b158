/**
 * Session keeping shared by the tabs of one origin: which access token to present, how to get a
 * new one, and how tabs agree on it. No browser API is touched here: the HTTP API, the shared
 * store (localStorage), the cross-tab lock (Web Locks) and the channel (BroadcastChannel) are
 * injected ({@link SessionEnv}), so the policy runs under Node's test runner with fakes of them
 * and a fake clock.
 *
 * The policy:
 * - One tab refreshes at a time: every refresh runs under the origin-wide lock. Under it, the
 *   tab first re-reads what the others did: if another tab already renewed (a newer access
 *   token, in the store or received on the channel), that token is adopted and nothing is spent.
 * - `storage` mode: the refresh token lives in the shared store; it is always read from there
 *   under the lock, so no tab presents a token another tab rotated. Before spending it the tab
 *   gives it a `retryKey`, saved first: a tab that dies with the request in flight (a reload, a
 *   lost response) leaves the key behind, and the next holder presents the same token with the
 *   same key and gets the same new pair (contract §2 rule 2) instead of `refresh_reused`.
 * - `cookie` mode: the refresh token lives in an HttpOnly cookie at `/auth` that JavaScript never
 *   sees; `POST /auth/refresh` carries it (with `Tether-CSRF: 1`). The store keeps who is
 *   signed in, the newest (short-lived) access token and the pending `retryKey`, never a
 *   refresh token.
 * - A sign-out, or a session the server ended (`refresh_invalid`, `refresh_reused`,
 *   `session_revoked`), clears the store and is announced on the channel: every tab signs out.
 */

import { TetherError } from "./errors.js";
import { classifyAuthCode } from "./protocol.js";
import { localExpiry, renewalDue } from "./reconnect.js";

/** Where the refresh token lives (contract §6). */
export type RefreshMode = "cookie" | "storage";

/** A token response of the HTTP auth API (§2); `refreshToken` is absent in cookie mode. */
export interface TokenResponse {
  userId: string;
  sessionId: string;
  accessToken: string;
  refreshToken?: string | null;
  expiresAt: number;
  serverTime: number;
}

/** The session one tab holds in memory. */
export interface Session {
  userId: string;
  sessionId: string;
  accessToken: string;
  /** The access token's `exp` and the server's clock when it was received (ms). */
  expiresAt: number;
  serverTime: number;
  /** The local wall clock when `serverTime` was read. */
  receivedAt: number;
}

/** What the shared store holds (localStorage, one key per deployment). */
export interface StoredState {
  userId: string;
  sessionId: string;
  /** `storage` mode only. */
  refreshToken?: string;
  /** The newest access token (both modes), so a new tab needs no refresh. */
  accessToken?: string;
  expiresAt?: number;
  serverTime?: number;
  receivedAt?: number;
  /** Given to the refresh token (or the cookie) about to be spent; kept until it is replaced. */
  retryKey?: string;
}

/** What tabs tell each other. Refresh tokens never travel on the channel. */
export type TabMessage =
  | { type: "session"; session: Session }
  | { type: "signed_out"; reason: string };

export interface AuthHttp {
  signIn(email: string, password: string, cookie: boolean): Promise<TokenResponse>;
  signUp(email: string, password: string, cookie: boolean): Promise<TokenResponse>;
  /** `refreshToken` `null`: the cookie's. */
  refresh(refreshToken: string | null, retryKey: string | null): Promise<TokenResponse>;
  signOut(accessToken: string, everywhere: boolean): Promise<void>;
}

export interface SharedStore {
  load(): StoredState | null;
  save(state: StoredState | null): void;
}

export interface TabChannel {
  post(message: TabMessage): void;
  /** Messages posted by the other tabs (never this one's own). */
  onMessage(listener: (message: TabMessage) => void): void;
  close(): void;
}

/** Runs `fn` while holding the origin-wide lock `name` (Web Locks, or an in-page mutex). */
export type LockRunner = <T>(name: string, fn: () => Promise<T>) => Promise<T>;

export interface SessionEnv {
  http: AuthHttp;
  store: SharedStore;
  channel: TabChannel;
  lock: LockRunner;
  /** Wall clock, ms since the epoch. */
  now: () => number;
  /** A fresh `retryKey` (16–128 characters, random). */
  newRetryKey: () => string;
}

/**
 * How long before its renewal deadline an access token is still good enough to present (or to
 * adopt from another tab instead of refreshing).
 */
export function isFresh(session: Session, now: number): boolean {
  return now < renewalDue(session.expiresAt, session.serverTime, session.receivedAt);
}

function sessionFrom(response: TokenResponse, receivedAt: number): Session {
  return {
    userId: response.userId,
    sessionId: response.sessionId,
    accessToken: response.accessToken,
    expiresAt: response.expiresAt,
    serverTime: response.serverTime,
    receivedAt,
  };
}

function storedSession(state: StoredState | null): Session | null {
  if (
    state === null ||
    state.accessToken === undefined ||
    state.expiresAt === undefined ||
    state.serverTime === undefined ||
    state.receivedAt === undefined
  ) {
    return null;
  }
  return {
    userId: state.userId,
    sessionId: state.sessionId,
    accessToken: state.accessToken,
    expiresAt: state.expiresAt,
    serverTime: state.serverTime,
    receivedAt: state.receivedAt,
  };
}

/** Newer: a later expiry of the same session, or another session altogether. */
function supersedes(candidate: Session, current: Session | null): boolean {
  if (current === null) return true;
  if (candidate.sessionId !== current.sessionId) return true;
  return candidate.expiresAt > current.expiresAt;
}

export type SessionListener = (session: Session | null, reason: string | null) => void;

/**
 * One tab's view of the origin's session. {@link current} is what this tab presents; it changes
 * when this tab signs in, renews, or adopts another tab's result, and every change is reported
 * to the listener (the client shell, which authenticates its connection with it).
 */
export class SessionKeeper {
  current: Session | null = null;
  /** Counts the refreshes this tab made (for the demo's session panel and for tests). */
  refreshCount = 0;
  private renewing: Promise<Session | null> | null = null;
  private readonly listeners = new Set<SessionListener>();
  private readonly lockName: string;

  constructor(
    readonly mode: RefreshMode,
    private readonly env: SessionEnv,
    /** Names the deployment, so two deployments on one origin keep separate sessions. */
    readonly key: string,
  ) {
    this.lockName = `tether-refresh:${key}`;
    env.channel.onMessage((m) => this.onTabMessage(m));
  }

  onChange(listener: SessionListener): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  private set(session: Session | null, reason: string | null): void {
    this.current = session;
    for (const listener of [...this.listeners]) listener(session, reason);
  }

  /**
   * Read the session the origin already holds at start: in `storage` mode the stored one (its
   * access token may be stale; {@link freshToken} renews it).
   */
  restore(): { userId: string; sessionId: string } | null {
    const state = this.env.store.load();
    if (state === null) return null;
    const session = storedSession(state);
    if (session !== null) this.current = session;
    return { userId: state.userId, sessionId: state.sessionId };
  }

  /** Whether the origin has a session (this tab's, or one in the shared store). */
  hasSession(): boolean {
    return this.current !== null || this.env.store.load() !== null;
  }

  /** Sign in or up over HTTP; the new session is adopted by every tab. */
  async signIn(kind: "signIn" | "signUp", email: string, password: string): Promise<Session> {
    const cookie = this.mode === "cookie";
    const response =
      kind === "signIn"
        ? await this.env.http.signIn(email, password, cookie)
        : await this.env.http.signUp(email, password, cookie);
    const session = sessionFrom(response, this.env.now());
    this.save(session, response.refreshToken ?? undefined);
    this.env.channel.post({ type: "session", session });
    this.set(session, "signed_in");
    return session;
  }

  /**
   * An access token fresh enough to present now; renews first when this tab's is not.
   * `null`: there is no session (any more).
   */
  async freshToken(): Promise<string | null> {
    const session = this.current;
    if (session !== null && isFresh(session, this.env.now())) return session.accessToken;
    if (!this.hasSession()) return null;
    return (await this.renew(session?.accessToken ?? null))?.accessToken ?? null;
  }

  /**
   * Renew the access token `stale` (the one this tab presents; `null` if it has none). Runs
   * once per tab at a time and under the origin-wide lock; resolves to the session to present,
   * or `null` when the session ended. A passing failure (`unavailable`, `rate_limited`, the
   * network) rejects with a {@link TetherError} and changes nothing: try again later.
   */
  renew(stale: string | null): Promise<Session | null> {
    if (this.renewing === null) {
      this.renewing = this.env
        .lock(this.lockName, () => this.renewLocked(stale))
        .finally(() => {
          this.renewing = null;
        });
    }
    return this.renewing;
  }

  private async renewLocked(stale: string | null): Promise<Session | null> {
    const now = this.env.now();
    // Another tab renewed while we waited for the lock: adopt its result, spend nothing.
    const state = this.env.store.load();
    const stored = storedSession(state);
    for (const candidate of [this.current, stored]) {
      if (candidate !== null && candidate.accessToken !== stale && isFresh(candidate, now)) {
        if (candidate !== this.current) this.set(candidate, "adopted");
        return candidate;
      }
    }
    if (state === null) {
      // No session in the store: another tab signed out, or none ever existed.
      if (this.current !== null) this.end("signed_out", false);
      return null;
    }
    if (this.mode === "storage" && state.refreshToken === undefined) {
      this.end("refresh_invalid", true);
      return null;
    }
    // Save the retryKey before spending the token: if this tab dies with the request in
    // flight, the next holder presents the same token with the same key (§2 rule 2).
    const retryKey = state.retryKey ?? this.env.newRetryKey();
    if (state.retryKey === undefined) this.env.store.save({ ...state, retryKey });
    let response: TokenResponse;
    try {
      response = await this.env.http.refresh(
        this.mode === "storage" ? state.refreshToken! : null,
        retryKey,
      );
    } catch (error) {
      if (error instanceof TetherError && classifyAuthCode(error.code) === "session_ended") {
        this.end(error.code, true);
        return null;
      }
      throw error;
    }
    this.refreshCount += 1;
    const session = sessionFrom(response, this.env.now());
    this.save(session, response.refreshToken ?? undefined);
    this.env.channel.post({ type: "session", session });
    this.set(session, "refreshed");
    return session;
  }

  private save(session: Session, refreshToken: string | undefined): void {
    // The short-lived access token is shared through the store in both modes, so a new tab
    // or one that waited for the lock adopts it without spending the refresh token again.
    const state: StoredState = {
      userId: session.userId,
      sessionId: session.sessionId,
      accessToken: session.accessToken,
      expiresAt: session.expiresAt,
      serverTime: session.serverTime,
      receivedAt: session.receivedAt,
    };
    if (this.mode === "storage") {
      if (typeof refreshToken !== "string") {
        throw new TetherError("invalid_request", "the server returned no refresh token (is it in cookie mode?)");
      }
      state.refreshToken = refreshToken;
    }
    this.env.store.save(state); // a new token has no retryKey yet
  }

  /**
   * Sign out this session on the server, and every tab locally. An access token too old to
   * present (the tab slept past its expiry) is renewed first: the server ends a session only for
   * a valid access token, and the refresh token it would otherwise leave alive is still good.
   */
  async signOut(everywhere: boolean): Promise<void> {
    try {
      let session = this.current;
      if ((session === null || !isFresh(session, this.env.now())) && this.hasSession()) {
        session = await this.renew(session?.accessToken ?? null); // null: it had ended already
      }
      if (session !== null) await this.env.http.signOut(session.accessToken, everywhere);
    } catch (error) {
      // A token the server no longer accepts (expired, revoked) has no session to end.
      if (!(error instanceof TetherError && error.code === "invalid_token")) {
        this.end(everywhere ? "signed_out_everywhere" : "signed_out", true);
        throw error;
      }
    }
    this.end(everywhere ? "signed_out_everywhere" : "signed_out", true);
  }

  /** The session ended (`reason`): forget it in every tab. */
  end(reason: string, announce: boolean): void {
    const hadState = this.env.store.load() !== null;
    if (hadState) this.env.store.save(null);
    if (announce) this.env.channel.post({ type: "signed_out", reason });
    if (this.current !== null || hadState) this.set(null, reason);
  }

  /** The local time at which this tab's access token expires, or `null`. */
  localExpiry(): number | null {
    const s = this.current;
    return s === null ? null : localExpiry(s.expiresAt, s.serverTime, s.receivedAt);
  }

  private onTabMessage(message: TabMessage): void {
    switch (message.type) {
      case "session":
        if (supersedes(message.session, this.current)) this.set(message.session, "adopted");
        return;
      case "signed_out":
        if (this.current !== null) this.set(null, message.reason);
        return;
    }
  }

  close(): void {
    this.env.channel.close();
    this.listeners.clear();
  }
}
