/**
 * The I/O shell: {@link TetherClient}, the public surface of contract §6.
 *
 * It owns one `/sync` WebSocket at a time and everything around it in one place: opening and
 * reconnecting (with the {@link Reconnector}'s jittered backoff and the close-code ranges), the
 * heartbeat, the timers, and the page's wake-ups (`visibilitychange`, `online`, `pageshow`,
 * `focus`, `resume`). The protocol state lives in {@link ClientCore} and the session policy in
 * {@link SessionKeeper} (or, after {@link TetherClient.setAuth}, in the application's
 * `fetchToken`); this module moves frames between them and the socket.
 *
 * Keeping the session alive does not rely on this tab's timers, which browsers throttle in
 * background tabs: the server's `auth_expiring` push triggers the renewal, the page's wake-up
 * events re-check it, and the timer is only the fallback.
 */

import {
  ClientCore,
  UNBOUND,
  tokenSubject,
  type CoreEvent,
  type User,
} from "./core.js";
import {
  BroadcastTabChannel,
  FetchAuthHttp,
  LocalStorageStore,
  defaultSyncUrl,
  httpBaseUrl,
  randomClientId,
  randomRetryKey,
  webLockRunner,
} from "./browser.js";
import { TetherError } from "./errors.js";
import { ClientErrorCode, classifyAuthCode } from "./protocol.js";
import { Backoff, Reconnector, localExpiry, renewalDue } from "./reconnect.js";
import {
  SessionKeeper,
  type RefreshMode,
  type Session,
  type SessionEnv,
} from "./session.js";

/** The session as the application sees it (§6). Routine renewals do not change `state`. */
export interface AuthInfo {
  /** `refreshing`: a session is held but no identity is confirmed yet (start, after a sleep). */
  readonly state: "signedIn" | "signedOut" | "refreshing";
  readonly userId: string | null;
  /** The access token's `exp` (ms since the epoch, server clock), or `null`. */
  readonly expiresAt: number | null;
}

export type ConnectionState = "connecting" | "connected" | "reconnecting" | "stopped";

/** `fetchToken` of {@link TetherClient.setAuth}: an access JWT for the identity, or `null`. */
export type FetchToken = (args: { forceRefreshToken: boolean }) => Promise<string | null | undefined>;

export type QueryCallback = (value: unknown, error: TetherError | undefined) => void;

export interface MutateOptions {
  /** Re-send a mutation whose outcome the application did not learn, with its `requestId`. */
  requestId?: number;
  /**
   * Give up waiting after this many ms: the promise rejects with `outcome_unknown` and the
   * `requestId`, which the application may re-send (§5 rule 3). Default: wait until an answer.
   */
  timeoutMs?: number;
}

export interface TetherClientOptions {
  /** The `/sync` WebSocket URL; default: this page's origin + `/sync`. */
  url?: string;
  /** Where the refresh token lives: `cookie` (default) or `storage` (§6). */
  refresh?: RefreshMode;
  /** The HTTP auth API's base URL; default: derived from `url`. */
  authUrl?: string;
  /** Seconds between pings; the server drops a silent client after 75 s. */
  pingIntervalMs?: number;
  /** A socket on which nothing arrived this long after a ping is taken for dead. */
  pongTimeoutMs?: number;
  /** A socket not open this long after it was created is abandoned (and retried). */
  openTimeoutMs?: number;
  /** Reconnect backoff (default 100 ms doubling to 16 s, full jitter). */
  backoff?: Backoff;
  /** Injected for non-browser hosts and tests. */
  WebSocket?: typeof WebSocket;
  fetch?: typeof fetch;
  /** Overrides of the session environment (store, channel, lock, HTTP). */
  sessionEnv?: Partial<SessionEnv>;
}

const SIGNED_OUT: AuthInfo = Object.freeze({ state: "signedOut", userId: null, expiresAt: null });

/** Client-side close code for a socket taken for dead (no answer to a ping). */
const CLOSE_DEAD_SOCKET = 4000;

/** One caller awaiting a mutation's outcome (a re-send with the same `requestId` adds one). */
interface Waiter {
  resolve: (value: unknown) => void;
  reject: (error: TetherError) => void;
  timer: ReturnType<typeof setTimeout> | null;
}

type TimerName = "reconnect" | "renew" | "retry" | "ping" | "pong";

export class TetherClient {
  readonly url: string;
  readonly refreshMode: RefreshMode;
  private readonly core: ClientCore;
  private readonly keeper: SessionKeeper;
  private readonly reconnector: Reconnector;
  private readonly WebSocketImpl: typeof WebSocket;
  private readonly pingIntervalMs: number;
  private readonly pongTimeoutMs: number;
  private readonly openTimeoutMs: number;

  private fetchToken: FetchToken | null = null;
  /** The token `fetchToken` last returned (presented on each new connection). */
  private externalToken: string | null = null;
  private ws: WebSocket | null = null;
  /** Increments with every connection attempt; callbacks of older ones are ignored. */
  private generation = 0;
  private opening = false;
  private closed = false;
  private connState: ConnectionState = "connecting";
  /** The access token last presented on the current connection (`null`: none). */
  private presented: string | null = null;
  /** authVersion → the token that request presented, until it is answered. */
  private readonly authTokens = new Map<number, string | null>();
  private authInfo: AuthInfo = SIGNED_OUT;
  private readonly authListeners = new Set<(auth: AuthInfo) => void>();
  private readonly queries = new Map<number, QueryCallback>();
  private readonly pending = new Map<number, Waiter[]>();
  private renewing = false;
  private readonly timers: Record<TimerName, ReturnType<typeof setTimeout> | null> = {
    reconnect: null,
    renew: null,
    retry: null,
    ping: null,
    pong: null,
  };
  private readonly detach: Array<() => void> = [];

  constructor(options: TetherClientOptions = {}) {
    this.url = options.url ?? defaultSyncUrl();
    this.refreshMode = options.refresh ?? "cookie";
    if (this.refreshMode !== "cookie" && this.refreshMode !== "storage") {
      throw new TypeError(`refresh must be "cookie" or "storage", not ${String(this.refreshMode)}`);
    }
    const WS = options.WebSocket ?? (globalThis as { WebSocket?: typeof WebSocket }).WebSocket;
    if (WS === undefined) throw new TypeError("no WebSocket implementation: pass `WebSocket`");
    this.WebSocketImpl = WS;
    this.pingIntervalMs = options.pingIntervalMs ?? 25_000;
    this.pongTimeoutMs = options.pongTimeoutMs ?? 10_000;
    this.openTimeoutMs = options.openTimeoutMs ?? 10_000;
    this.core = new ClientCore(randomClientId());
    this.reconnector = new Reconnector(options.backoff ?? new Backoff());
    const base = options.authUrl ?? httpBaseUrl(this.url);
    const key = `tether:${base}`;
    const given = options.sessionEnv ?? {};
    const env: SessionEnv = {
      http: given.http ?? new FetchAuthHttp(base, this.refreshMode === "cookie", options.fetch),
      store: given.store ?? new LocalStorageStore(`${key}:${this.refreshMode}`),
      channel: given.channel ?? new BroadcastTabChannel(`${key}:${this.refreshMode}`),
      lock: given.lock ?? webLockRunner(),
      now: given.now ?? (() => Date.now()),
      newRetryKey: given.newRetryKey ?? randomRetryKey,
    };
    this.keeper = new SessionKeeper(this.refreshMode, env, key);
    this.keeper.onChange((session, reason) => this.onSessionChange(session, reason));
    const restored = this.keeper.restore();
    if (restored !== null) {
      const s = this.keeper.current;
      this.setAuthInfo({
        state: s !== null && Date.now() < localExpiry(s.expiresAt, s.serverTime, s.receivedAt) ? "signedIn" : "refreshing",
        userId: restored.userId,
        expiresAt: s?.expiresAt ?? null,
      });
    }
    this.listenToPage();
    void this.connect();
  }

  // ---------------------------------------------------------------- public surface (§6)

  /** The session as the application sees it. */
  get auth(): AuthInfo {
    return this.authInfo;
  }

  /** The socket as the application sees it. */
  get connectionState(): ConnectionState {
    return this.connState;
  }

  /** Refreshes this tab made (the other tabs adopt them); for session panels and tests. */
  get refreshCount(): number {
    return this.keeper.refreshCount;
  }

  onAuthChange(listener: (auth: AuthInfo) => void): () => void {
    this.authListeners.add(listener);
    return () => {
      this.authListeners.delete(listener);
    };
  }

  async signUp(credentials: { email: string; password: string }): Promise<AuthInfo> {
    return this.signInWith("signUp", credentials);
  }

  async signIn(credentials: { email: string; password: string }): Promise<AuthInfo> {
    return this.signInWith("signIn", credentials);
  }

  private async signInWith(
    kind: "signIn" | "signUp",
    { email, password }: { email: string; password: string },
  ): Promise<AuthInfo> {
    this.checkOpen();
    this.fetchToken = null;
    this.externalToken = null;
    await this.keeper.signIn(kind, email, password);
    this.wake(true);
    return this.authInfo;
  }

  /** End this session on the server; every tab of the origin signs out. */
  async signOut(): Promise<void> {
    this.checkOpen();
    await this.keeper.signOut(false);
  }

  /** End every session of the user on the server; every tab of the origin signs out. */
  async signOutEverywhere(): Promise<void> {
    this.checkOpen();
    await this.keeper.signOut(true);
  }

  /**
   * Use identities issued elsewhere: `fetchToken({ forceRefreshToken })` returns an access JWT
   * (or `null`: no user). It is called when a connection opens, when the server says the token
   * is about to expire (`forceRefreshToken: true`), and once more when a token is refused.
   */
  setAuth(fetchToken: FetchToken): void {
    this.checkOpen();
    this.fetchToken = fetchToken;
    this.externalToken = null;
    void this.presentExternal(false);
  }

  /** Call `callback(value, error)` with every new result of query `name(args)`. */
  subscribe(name: string, args: Record<string, unknown>, callback: QueryCallback): () => void {
    this.checkOpen();
    const handle = this.core.subscribe(name, args);
    this.queries.set(handle, callback);
    this.pump();
    return () => {
      if (!this.queries.delete(handle)) return;
      this.core.unsubscribe(handle);
      this.pump();
    };
  }

  /**
   * Run mutation `name(args)` exactly once (re-sent with the same `requestId` across
   * reconnects) and resolve with its value; reject with a {@link TetherError} `{ code }`.
   * `unavailable` is never a final answer (§5 rule 3).
   */
  mutate(name: string, args: Record<string, unknown> = {}, options: MutateOptions = {}): Promise<unknown> {
    this.checkOpen();
    let requestId: number;
    try {
      requestId = this.core.mutate(name, args, this.mutationUser(), options.requestId);
    } catch (error) {
      return Promise.reject(error);
    }
    const promise = new Promise<unknown>((resolve, reject) => {
      const waiter: Waiter = { resolve, reject, timer: null };
      if (options.timeoutMs !== undefined) {
        waiter.timer = setTimeout(() => {
          this.dropWaiter(requestId, waiter);
          reject(
            new TetherError(
              ClientErrorCode.OUTCOME_UNKNOWN,
              `no definite answer within ${options.timeoutMs} ms; re-send with this requestId to learn it`,
              requestId,
            ),
          );
        }, options.timeoutMs);
      }
      const waiters = this.pending.get(requestId);
      if (waiters !== undefined) waiters.push(waiter);
      else this.pending.set(requestId, [waiter]);
    });
    this.pump();
    return promise;
  }

  /** A caller gave up: when none is left, the core stops sending the mutation. */
  private dropWaiter(requestId: number, waiter: Waiter): void {
    const waiters = this.pending.get(requestId);
    if (waiters === undefined) return;
    const rest = waiters.filter((w) => w !== waiter);
    if (rest.length > 0) {
      this.pending.set(requestId, rest);
      return;
    }
    this.pending.delete(requestId);
    this.core.forgetMutation(requestId);
  }

  /** Close the connection for good and stop every timer and listener. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.generation += 1;
    for (const off of this.detach.splice(0)) off();
    this.clearTimers();
    const ws = this.ws;
    this.ws = null;
    if (ws !== null) ws.close(1000);
    this.core.connectionLost();
    for (const [requestId, waiters] of this.pending) {
      for (const w of waiters) {
        if (w.timer !== null) clearTimeout(w.timer);
        w.reject(new TetherError(ClientErrorCode.CLOSED, "the client was closed before an answer", requestId));
      }
    }
    this.pending.clear();
    this.queries.clear();
    this.authListeners.clear();
    this.keeper.close();
    this.setConnState("stopped");
  }

  // ---------------------------------------------------------------- connection

  private async connect(): Promise<void> {
    if (this.closed || this.ws !== null || this.opening) return;
    this.opening = true;
    const gen = ++this.generation;
    if (this.connState === "stopped") this.setConnState("connecting");
    let token: string | null;
    try {
      token = await this.tokenForConnect();
    } catch {
      // A passing failure (network, unavailable): connecting anonymously would run the
      // subscriptions as nobody and flash signed-out results; wait and try again instead.
      this.opening = false;
      if (gen === this.generation) this.scheduleReconnect(null);
      return;
    }
    if (gen !== this.generation || this.closed) {
      this.opening = false;
      return;
    }
    let ws: WebSocket;
    try {
      ws = new this.WebSocketImpl(this.url);
    } catch {
      this.opening = false;
      this.scheduleReconnect(null);
      return;
    }
    this.ws = ws;
    this.opening = false;
    ws.onopen = () => {
      clearTimeout(openTimer);
      if (gen !== this.generation || ended) return;
      this.core.connectionOpened();
      this.presented = null;
      // connect, authenticate, the subscriptions, back to back (§5 rule 1). The keeper's
      // session may be newer than the token fetched (another tab renewed meanwhile).
      this.present(this.fetchToken !== null ? this.externalToken : (this.keeper.current?.accessToken ?? token));
      this.core.pipeline();
      this.pump();
      this.startHeartbeat();
    };
    ws.onmessage = (event: MessageEvent) => {
      if (gen !== this.generation) return;
      this.alive();
      if (typeof event.data !== "string") return;
      for (const e of this.core.receive(event.data)) this.handle(e);
      this.core.flush(); // what the frame made due (mutations after an auth_ok, a settled gap)
      this.pump();
    };
    // The socket ends once: by its close event, by an error (some implementations, Node's
    // among them, fire no close event after a failed handshake), or by the open timeout.
    let ended = false;
    const end = (code: number | null): void => {
      if (ended) return;
      ended = true;
      clearTimeout(openTimer);
      if (gen !== this.generation || this.ws !== ws) return;
      this.lost(code);
    };
    const openTimer = setTimeout(() => {
      if (ws.readyState !== 0) return;
      end(null);
      try {
        ws.close();
      } catch {
        // never opened
      }
    }, this.openTimeoutMs);
    ws.onclose = (event: CloseEvent) => end(event.code === 1005 || event.code === 1006 ? null : event.code);
    ws.onerror = () => {
      if (ws.readyState === 1) return; // an open socket's error is followed by its close
      end(null);
    };
  }

  private async tokenForConnect(): Promise<string | null> {
    const fetchToken = this.fetchToken;
    if (fetchToken !== null) {
      const token = (await fetchToken({ forceRefreshToken: false })) ?? null;
      if (fetchToken === this.fetchToken) this.externalToken = token;
      return token;
    }
    return this.keeper.freshToken();
  }

  private lost(closeCode: number | null): void {
    this.ws = null;
    this.authTokens.clear();
    this.stopHeartbeat();
    this.core.connectionLost();
    this.presented = null;
    this.scheduleReconnect(closeCode);
  }

  private scheduleReconnect(closeCode: number | null): void {
    if (this.closed) return;
    const plan = this.reconnector.plan(closeCode, performance.now());
    if (plan.decision === "stop") {
      this.setConnState("stopped"); // until something changes: a wake-up event, a sign-in
      return;
    }
    this.setConnState("reconnecting");
    this.clearTimer("reconnect");
    this.timers.reconnect = setTimeout(() => {
      this.timers.reconnect = null;
      void this.connect();
    }, plan.delayMs);
  }

  /** Send what the core queued. */
  private pump(): void {
    const ws = this.ws;
    const frames = this.core.dataToSend();
    if (ws === null || ws.readyState !== 1) return; // queued frames are rebuilt on the next connection
    for (const frame of frames) ws.send(frame);
    this.scheduleMutationRetry();
  }

  private scheduleMutationRetry(): void {
    const at = this.core.nextRetryAt();
    this.clearTimer("retry");
    if (at === null) return;
    this.timers.retry = setTimeout(
      () => {
        this.timers.retry = null;
        this.core.flush();
        this.pump();
      },
      Math.max(0, at - performance.now()),
    );
  }

  // ---------------------------------------------------------------- heartbeat

  private startHeartbeat(): void {
    this.stopHeartbeat();
    this.timers.ping = setInterval(() => this.ping(this.pongTimeoutMs), this.pingIntervalMs);
  }

  private stopHeartbeat(): void {
    this.clearTimer("ping");
    this.clearTimer("pong");
  }

  /** Ping, and drop the socket if nothing at all arrives within `timeoutMs`. */
  private ping(timeoutMs: number): void {
    const ws = this.ws;
    if (ws === null || ws.readyState !== 1 || this.core.phase === "closed") return;
    this.core.ping();
    this.pump();
    if (this.timers.pong !== null) return;
    this.timers.pong = setTimeout(() => {
      this.timers.pong = null;
      if (this.ws !== ws) return;
      // A frozen or sleeping page's socket may be dead without a close event: replace it.
      this.generation += 1;
      this.ws = null;
      try {
        ws.close(CLOSE_DEAD_SOCKET);
      } catch {
        // already closing
      }
      this.lost(null);
    }, timeoutMs);
  }

  private alive(): void {
    this.clearTimer("pong");
  }

  // ---------------------------------------------------------------- frames

  private handle(e: CoreEvent): void {
    switch (e.type) {
      case "connected":
        this.reconnector.connected(performance.now());
        this.setConnState("connected");
        return;
      case "auth_ok":
        this.authTokens.delete(e.authVersion);
        if (e.authVersion !== this.core.authVersion) return;
        if (e.identity !== null && e.expiresAt !== null) {
          this.setAuthInfo({ state: "signedIn", userId: e.identity.userId, expiresAt: e.expiresAt });
          this.scheduleRenewal(e.expiresAt, e.serverTime);
        }
        return;
      case "auth_failed": {
        const token = this.authTokens.get(e.authVersion);
        this.authTokens.delete(e.authVersion);
        if (e.authVersion !== this.core.authVersion) return; // a newer request is on its way
        const current = this.fetchToken === null ? this.keeper.current : null;
        if (current !== null && token !== undefined && token !== current.accessToken) {
          // The refused token is not the session's current one (adopted meanwhile): present
          // that instead of ending a session on the strength of an old token.
          this.presented = null;
          this.present(current.accessToken);
          return;
        }
        this.onAuthFailed(e.code);
        return;
      }
      case "auth_expiring":
        void this.renew();
        return;
      case "auth_expired":
        if (this.hasCredentials()) {
          this.setAuthInfo({ ...this.authInfo, state: "refreshing" });
          void this.renew();
        } else {
          this.core.authenticate(null); // end the lapsed state: run as anonymous
        }
        return;
      case "session_revoked": {
        if (this.fetchToken !== null) {
          void this.presentExternal(true);
          return;
        }
        const current = this.keeper.current;
        if (current !== null && current.sessionId !== e.sessionId) {
          // About a session this tab already left (another tab signed in anew and this one
          // adopted it while the push was on its way): present the current one again.
          this.presented = null;
          this.present(current.accessToken);
          return;
        }
        this.keeper.end(e.reason, true);
        return;
      }
      case "query_update": {
        const cb = this.queries.get(e.queryId);
        if (cb === undefined) return;
        if (e.error !== undefined) cb(undefined, new TetherError(e.error.code, e.error.message));
        else cb(e.value, undefined);
        return;
      }
      case "query_rejected": {
        const cb = this.queries.get(e.queryId);
        this.queries.delete(e.queryId);
        cb?.(undefined, new TetherError(e.code, e.message));
        return;
      }
      case "mutation_done": {
        const waiters = this.pending.get(e.requestId) ?? [];
        this.pending.delete(e.requestId);
        for (const w of waiters) {
          if (w.timer !== null) clearTimeout(w.timer);
          if (e.error !== undefined) w.reject(new TetherError(e.error.code, e.error.message, e.requestId));
          else w.resolve(e.value);
        }
        return;
      }
      case "mutation_deferred":
        this.scheduleMutationRetry();
        return;
      case "server_error":
      case "pong":
      case "unrecognized":
        return;
    }
  }

  private onAuthFailed(code: string): void {
    const kind = classifyAuthCode(code);
    if (kind === "passing") {
      // §5 rule 2: the identity stays; try again after a backoff (before it expires).
      this.retryRenewalSoon();
      return;
    }
    if (this.fetchToken !== null) {
      void this.presentExternal(true, true);
      return;
    }
    if (kind === "new_token") void this.renew();
    else this.keeper.end(code, true);
  }

  // ---------------------------------------------------------------- auth

  private hasCredentials(): boolean {
    return this.fetchToken !== null || this.keeper.hasSession();
  }

  /** Present `token` on the current connection (once per token). */
  private present(token: string | null): void {
    if (this.core.phase === "closed" || token === this.presented) return;
    this.presented = token;
    const user: User = token === null ? null : tokenSubject(token);
    this.authTokens.set(this.core.authenticate(token, user), token);
    this.pump();
  }

  private onSessionChange(session: Session | null, reason: string | null): void {
    if (this.fetchToken !== null) return;
    if (session === null) {
      this.setAuthInfo(SIGNED_OUT);
      this.clearTimer("renew");
      for (const e of this.core.abandonUserMutations()) this.handle(e);
      if (this.core.phase !== "closed") {
        if (this.core.identity !== null || this.core.lapsed || this.presented !== null) {
          this.presented = null;
          this.core.authenticate(null);
        } else {
          this.core.identitySettled();
        }
        this.pump();
      }
      void reason;
      return;
    }
    if (this.authInfo.state !== "signedIn" || this.authInfo.userId !== session.userId) {
      this.setAuthInfo({ state: "signedIn", userId: session.userId, expiresAt: session.expiresAt });
    } else if (this.authInfo.expiresAt !== session.expiresAt) {
      this.setAuthInfo({ ...this.authInfo, expiresAt: session.expiresAt });
    }
    this.present(session.accessToken);
  }

  /** Renew the access token now (once at a time in this tab; under the lock across tabs). */
  private async renew(): Promise<void> {
    if (this.fetchToken !== null) return this.presentExternal(true);
    if (this.renewing) return;
    this.renewing = true;
    try {
      const session = await this.keeper.renew(this.presented ?? this.keeper.current?.accessToken ?? null);
      if (session !== null) this.present(session.accessToken);
      if (this.ws === null && !this.opening) this.wake(true);
    } catch {
      this.retryRenewalSoon();
    } finally {
      this.renewing = false;
    }
  }

  /**
   * Ask `fetchToken` for a token and present it. `afterRefusal`: the server refused the token
   * presented; if the provider answers with that same token again, the identity is given up
   * (signed out) instead of presenting it in a loop.
   */
  private async presentExternal(force: boolean, afterRefusal = false): Promise<void> {
    const fetchToken = this.fetchToken;
    if (fetchToken === null) return;
    const refused = afterRefusal ? this.presented : null;
    let token: string | null;
    try {
      token = (await fetchToken({ forceRefreshToken: force })) ?? null;
    } catch {
      this.retryRenewalSoon();
      return;
    }
    if (fetchToken !== this.fetchToken) return; // replaced meanwhile
    if (afterRefusal && token !== null && token === refused) token = null;
    this.externalToken = token;
    if (token === null) {
      this.setAuthInfo(SIGNED_OUT);
      for (const e of this.core.abandonUserMutations()) this.handle(e);
    } else {
      const sub = tokenSubject(token);
      if (typeof sub === "string" && this.authInfo.userId !== sub) {
        this.setAuthInfo({ state: "refreshing", userId: sub, expiresAt: null });
      }
    }
    this.present(token);
    if (this.core.phase !== "closed") this.core.identitySettled();
    this.pump();
  }

  private scheduleRenewal(expiresAt: number, serverTime: number): void {
    this.clearTimer("renew");
    const due = renewalDue(expiresAt, serverTime, Date.now());
    // The fallback for a missing auth_expiring; background tabs may fire it late.
    this.timers.renew = setTimeout(
      () => {
        this.timers.renew = null;
        void this.renew();
      },
      Math.max(0, due - Date.now()),
    );
  }

  private retryRenewalSoon(): void {
    this.clearTimer("renew");
    const delay = 250 + Math.random() * 1_750;
    this.timers.renew = setTimeout(() => {
      this.timers.renew = null;
      void this.renew();
    }, delay);
  }

  private mutationUser(): User {
    if (this.fetchToken !== null) {
      return this.authInfo.userId ?? UNBOUND;
    }
    switch (this.authInfo.state) {
      case "signedIn":
        return this.authInfo.userId;
      case "signedOut":
        return null;
      case "refreshing":
        return this.authInfo.userId ?? UNBOUND;
    }
  }

  // ---------------------------------------------------------------- the page

  private listenToPage(): void {
    const target = globalThis as unknown as Partial<EventTarget>;
    const doc = (globalThis as { document?: Document }).document;
    const on = (t: Partial<EventTarget> | undefined, type: string, fn: () => void): void => {
      if (t?.addEventListener === undefined) return;
      t.addEventListener(type, fn);
      this.detach.push(() => t.removeEventListener?.(type, fn));
    };
    const wakeNow = () => this.wake(false);
    on(target, "online", () => this.wake(true));
    on(target, "pageshow", wakeNow);
    on(target, "focus", wakeNow);
    on(doc, "resume", wakeNow);
    on(doc, "visibilitychange", () => {
      if (doc?.visibilityState === "visible") wakeNow();
    });
  }

  /**
   * The page woke up (shown, focused, resumed, back online) or something changed: reconnect now
   * if the socket is gone, check a socket that may have died while the page slept, and renew a
   * token whose deadline passed while timers were throttled or frozen.
   */
  private wake(resetBackoff: boolean): void {
    if (this.closed) return;
    if (this.ws === null) {
      if (resetBackoff || this.connState === "stopped" || this.timers.reconnect !== null) {
        this.reconnector.reset();
      }
      this.clearTimer("reconnect");
      void this.connect();
      return;
    }
    this.ping(Math.min(this.pongTimeoutMs, 5_000));
    if (this.fetchToken === null) {
      const s = this.keeper.current;
      if (s !== null && Date.now() >= renewalDue(s.expiresAt, s.serverTime, s.receivedAt)) void this.renew();
      else if (s === null && this.keeper.hasSession()) void this.renew();
    }
  }

  // ---------------------------------------------------------------- helpers

  private setAuthInfo(auth: AuthInfo): void {
    const old = this.authInfo;
    if (old.state === auth.state && old.userId === auth.userId && old.expiresAt === auth.expiresAt) return;
    this.authInfo = Object.freeze({ ...auth });
    for (const listener of [...this.authListeners]) listener(this.authInfo);
  }

  private setConnState(state: ConnectionState): void {
    this.connState = state;
  }

  private checkOpen(): void {
    if (this.closed) throw new TetherError(ClientErrorCode.CLOSED, "the client is closed");
  }

  private clearTimer(name: TimerName): void {
    const t = this.timers[name];
    if (t !== null) {
      clearTimeout(t);
      clearInterval(t);
      this.timers[name] = null;
    }
  }

  private clearTimers(): void {
    for (const name of Object.keys(this.timers) as TimerName[]) this.clearTimer(name);
  }
}

