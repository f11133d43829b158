/**
 * The client side of the `/sync` protocol, sans I/O: a port of the Python client's
 * `tether/client/core.py` (`ClientCore`), whose docstring explains each rule at length.
 *
 * Nothing here touches a socket, a timer or the page. {@link ClientCore} keeps the state of one
 * client across its connections — subscriptions, unacknowledged mutations, the `authVersion`
 * counter, the identity the server confirmed — turns the application's calls into frames
 * ({@link ClientCore.dataToSend}) and the server's frames into {@link CoreEvent}s
 * ({@link ClientCore.receive}). The shell (`client.ts`) moves frames and runs timers.
 *
 * The rules (contract §3 and §5):
 * - `connect` is the first frame of every connection, with the same `clientId` each time; an
 *   `authenticate`, the subscriptions and the mutations may follow at once (rule 1,
 *   {@link ClientCore.pipeline}).
 * - `authVersion` grows with every auth request the client ever sends.
 * - After a reconnect every live subscription is sent again, and every mutation without an
 *   outcome is sent again with its original `requestId` (exactly once, rule 3).
 * - A mutation belongs to the user it was issued under (rule 4). It is sent only when the
 *   connection runs as that user and no auth request awaits its answer (a failed request makes
 *   what follows it run anonymous, rule 1). When the identity it was sent under ends before its
 *   answer, it goes out again, same `requestId`, once the connection is that user again; it
 *   fails with `unauthenticated` when the connection becomes another user.
 * - After the server ended the identity (`auth_expired`, `session_revoked`) the connection is
 *   *lapsed* until an auth request of ours is answered: no mutation is sent.
 * - An auth request answered with another identity than expected opens a *gap* ({@link held}):
 *   nothing goes out until the next auth request is queued or the shell settles the identity;
 *   subscriptions pipelined behind it move to new `queryId`s so their results (computed for
 *   the wrong identity) never reach the application.
 * - `unavailable` is not an outcome (rule 3): the same `requestId` is sent again after a
 *   jittered backoff until a definite answer comes.
 */

import {
  ClientMessageType,
  DEFAULT_MAX_MESSAGE_BYTES,
  ErrorCode,
  IDENTITY_KEEPING_AUTH_CODES,
  MAX_SAFE_INT,
  PROTOCOL_VERSION,
  RETRY_MUTATION_CODES,
  ServerMessageType,
} from "./protocol.js";
import { DEFAULT_MUTATION_RETRY_BACKOFF, type Backoff } from "./reconnect.js";
import { TetherError } from "./errors.js";

/** A mutation issued before the client knew its user: it belongs to the first user it runs as. */
export const UNBOUND: unique symbol = Symbol("unbound");
/** An `authenticate` whose user is not known before its answer. */
export const UNKNOWN: unique symbol = Symbol("unknown");
/** A user id, `null` (anonymous), or one of the two markers above. */
export type User = string | null | typeof UNBOUND | typeof UNKNOWN;

/** How many requestIds a client may take per ms on average before a restart could reuse one. */
export const REQUEST_IDS_PER_MS = 1024;

/**
 * The first `requestId` of a client started at `nowMs` (wall clock). Outcomes live on the server
 * for a while keyed by `clientId` and `requestId`; a page that reloads with the same `clientId`
 * must not reuse an id of the page before, so ids start at a time-based value.
 */
export function initialRequestId(nowMs: number): number {
  return Math.min(Math.floor(nowMs) * REQUEST_IDS_PER_MS, MAX_SAFE_INT - 2 ** 32);
}

/** The message of the `unauthenticated` failure of a mutation whose user is gone. */
export const USER_CHANGED_MESSAGE =
  "the client's user changed (or signed out) before this mutation had an outcome; it was not " +
  "sent under the new identity (if it had been sent before, it may have been applied)";

export interface Identity {
  readonly userId: string;
  readonly sessionId: string;
}

export interface WireError {
  readonly code: string;
  readonly message: string;
}

export interface MintedTokens {
  readonly accessToken: string;
  readonly refreshToken: string;
  readonly expiresAt: number;
}

export type CoreEvent =
  | { type: "connected"; connectionId: string; serverTime: number; protocol: number }
  | {
      type: "auth_ok";
      authVersion: number;
      identity: Identity | null;
      expiresAt: number | null;
      serverTime: number;
      tokens: MintedTokens | null;
    }
  | { type: "auth_failed"; authVersion: number; code: string; message: string }
  | { type: "auth_expiring"; expiresAt: number; serverTime: number }
  | { type: "auth_expired"; expiresAt: number; serverTime: number }
  /** `sessionId`: the session the connection held when the push came (`null`: none). */
  | { type: "session_revoked"; reason: string; sessionId: string | null }
  | { type: "query_update"; queryId: number; version: number; value?: unknown; error?: WireError }
  | { type: "query_rejected"; queryId: number; code: string; message: string }
  | { type: "mutation_done"; requestId: number; value?: unknown; version?: number; error?: WireError }
  | { type: "mutation_deferred"; requestId: number; code: string; retryInMs: number }
  | { type: "server_error"; code: string; message: string }
  | { type: "pong"; serverTime: number }
  | { type: "unrecognized"; text: string };

export type Phase = "closed" | "opening" | "connected";

interface Subscription {
  name: string;
  args: Record<string, unknown>;
  /** Its `queryId` on the wire; the handle stays, the wire id moves after a failed auth. */
  wire: number;
  sent: boolean;
  /** The auth request it was sent behind, while that request is unanswered (rule 1). */
  behind: number | null;
}

interface Mutation {
  name: string;
  frame: string;
  user: User;
  sent: boolean;
  /** `authVersion` when it was last sent: it runs under what that request established. */
  epoch: number;
  attempt: number;
  retryAt: number | null;
}

export interface ClientCoreOptions {
  maxMessageBytes?: number;
  /** Monotonic ms; times re-sends of mutations answered without an outcome. */
  clock?: () => number;
  rand?: () => number;
  retryBackoff?: Backoff;
  firstRequestId?: number;
  protocol?: number;
}

function int(value: unknown): number | null {
  return typeof value === "number" && Number.isInteger(value) ? value : null;
}

function sameIdentity(a: Identity | null, b: Identity | null): boolean {
  if (a === null || b === null) return a === b;
  return a.userId === b.userId && a.sessionId === b.sessionId;
}

function wireError(raw: Record<string, unknown>): WireError {
  return { code: String(raw["code"]), message: String(raw["message"] ?? "") };
}

const encoder = new TextEncoder();

/**
 * The `sub` (user id) an access JWT names, read without checking anything (the server checks):
 * the user an `authenticate` with it establishes if accepted; {@link UNKNOWN} if not a JWT.
 */
export function tokenSubject(token: string): string | typeof UNKNOWN {
  const claims = decodeJwtPayload(token);
  const sub = claims?.["sub"];
  return typeof sub === "string" ? sub : UNKNOWN;
}

/** The payload of a JWT, unverified; `null` if `token` is not one. */
export function decodeJwtPayload(token: string): Record<string, unknown> | null {
  const parts = token.split(".");
  if (parts.length !== 3) return null;
  try {
    const b64 = parts[1]!.replace(/-/g, "+").replace(/_/g, "/");
    const padded = b64 + "=".repeat((4 - (b64.length % 4)) % 4);
    const bytes = Uint8Array.from(atob(padded), (c) => c.charCodeAt(0));
    const claims: unknown = JSON.parse(new TextDecoder().decode(bytes));
    return typeof claims === "object" && claims !== null && !Array.isArray(claims)
      ? (claims as Record<string, unknown>)
      : null;
  } catch {
    return null;
  }
}

/**
 * The protocol state of one client, across all of its connections. Calls queue frames; the
 * shell takes them with {@link dataToSend}, in order. Frames are encoded when created, so one
 * over `maxMessageBytes` fails the call that made it (`message_too_large`) instead of closing
 * the connection with 1009 later, and again after every replay.
 */
export class ClientCore {
  readonly clientId: string;
  readonly maxMessageBytes: number;
  readonly retryBackoff: Backoff;
  private readonly protocol: number;
  private readonly clock: () => number;
  private readonly rand: () => number;

  phase: Phase = "closed";
  ready = false;
  connectionId: string | null = null;
  /** The last authVersion sent; the next is larger, on any connection. */
  authVersion = 0;
  /** authVersion → the user that request is expected to establish, while unanswered. */
  readonly pendingAuth = new Map<number, User>();
  identity: Identity | null = null;
  identityExpiresAt: number | null = null;
  /** The user the server runs the next frame under (rule 1). */
  presumedUser: User = null;
  lapsed = false;
  held = false;
  /** The highest `version` seen. */
  version = 0;
  readonly subscriptions = new Map<number, Subscription>();
  private readonly wire = new Map<number, number>();
  readonly mutations = new Map<number, Mutation>();
  private nextQueryId = 1;
  private nextRequestId: number;
  private outbox: string[] = [];

  constructor(clientId: string, options: ClientCoreOptions = {}) {
    if (clientId.length < 1 || clientId.length > 128) {
      throw new RangeError("clientId must be 1 to 128 characters");
    }
    this.clientId = clientId;
    this.protocol = options.protocol ?? PROTOCOL_VERSION;
    this.maxMessageBytes = options.maxMessageBytes ?? DEFAULT_MAX_MESSAGE_BYTES;
    this.clock = options.clock ?? (() => performance.now());
    this.rand = options.rand ?? Math.random;
    this.retryBackoff = options.retryBackoff ?? DEFAULT_MUTATION_RETRY_BACKOFF;
    this.nextRequestId = options.firstRequestId ?? initialRequestId(Date.now());
  }

  // ---------------------------------------------------------------- frames

  private encode(frame: Record<string, unknown>): string {
    const text = JSON.stringify(frame);
    const size = encoder.encode(text).length;
    if (size > this.maxMessageBytes) {
      throw new TetherError(
        "message_too_large",
        `a frame of ${size} bytes is over the server's limit of ${this.maxMessageBytes}`,
      );
    }
    return text;
  }

  /** Frames to send, in order (JSON text); the outbox is empty afterwards. */
  dataToSend(): string[] {
    const out = this.outbox;
    this.outbox = [];
    return out;
  }

  // ---------------------------------------------------------------- connection

  /** A socket is open: queue `connect`. */
  connectionOpened(): void {
    this.phase = "opening";
    this.ready = false;
    this.held = false;
    this.lapsed = false;
    this.presumedUser = null; // a new connection is anonymous
    this.outbox = [
      this.encode({
        type: ClientMessageType.CONNECT,
        clientId: this.clientId,
        protocol: this.protocol,
      }),
    ];
  }

  /**
   * The socket is gone. Returns the authVersions that will never be answered. Subscriptions
   * and unacknowledged mutations are kept, unsent: they go out again on the next connection.
   */
  connectionLost(): number[] {
    this.phase = "closed";
    this.ready = false;
    this.connectionId = null;
    this.identity = null;
    this.identityExpiresAt = null;
    this.presumedUser = null;
    this.lapsed = false;
    this.held = false;
    this.outbox = [];
    for (const sub of this.subscriptions.values()) {
      sub.sent = false;
      sub.behind = null;
    }
    for (const mutation of this.mutations.values()) mutation.sent = false;
    const lost = [...this.pendingAuth.keys()];
    this.pendingAuth.clear();
    return lost;
  }

  /**
   * Send subscriptions now, before `connected` and before the answer to the auth request just
   * queued (rule 1); mutations wait for that answer.
   */
  pipeline(): void {
    if (this.phase === "closed") throw new Error("not connected");
    this.ready = true;
    this.held = false;
    this.flush();
  }

  /** Let operations flow (`true`) or hold new ones (`false`). */
  setReady(ready: boolean): void {
    if (ready && this.phase === "closed") throw new Error("not connected");
    this.ready = ready;
    if (ready) this.flush();
  }

  /** The shell settled the identity without a new auth request: what a gap held may go out. */
  identitySettled(): void {
    this.held = false;
    this.flush();
  }

  /** While ready and not held, send what is due. */
  flush(): void {
    if (!this.ready || this.held || this.phase === "closed") return;
    for (const sub of this.subscriptions.values()) {
      if (!sub.sent) this.sendSubscribe(sub);
    }
    this.sendMutations();
  }

  private sendMutations(): void {
    const presumed = this.presumedUser;
    if (presumed === UNKNOWN || this.pendingAuth.size > 0 || this.lapsed) return;
    const now = this.clock();
    for (const mutation of this.mutations.values()) {
      if (mutation.sent || (mutation.retryAt !== null && now < mutation.retryAt)) continue;
      if (mutation.user === UNBOUND) mutation.user = presumed;
      if (mutation.user !== presumed) continue;
      this.outbox.push(mutation.frame);
      mutation.sent = true;
      mutation.epoch = this.authVersion;
      mutation.retryAt = null;
    }
  }

  /** The earliest time (`clock`) a deferred mutation may go out again; `null` if none waits. */
  nextRetryAt(): number | null {
    let earliest: number | null = null;
    for (const m of this.mutations.values()) {
      if (!m.sent && m.retryAt !== null && (earliest === null || m.retryAt < earliest)) {
        earliest = m.retryAt;
      }
    }
    return earliest;
  }

  // ---------------------------------------------------------------- auth

  private authFrame(frame: Record<string, unknown>, user: User): number {
    if (this.phase === "closed") throw new Error("not connected");
    const version = this.authVersion + 1;
    const text = this.encode({ ...frame, authVersion: version });
    this.authVersion = version;
    this.pendingAuth.set(version, user);
    this.presumedUser = user;
    this.outbox.push(text);
    this.held = false; // what a failed request held goes out behind this one
    this.flush();
    return version;
  }

  /** Queue `authenticate` (`null`: become anonymous); returns its authVersion. */
  authenticate(token: string | null, user: User = UNKNOWN): number {
    return this.authFrame(
      { type: ClientMessageType.AUTHENTICATE, token },
      token === null ? null : user,
    );
  }

  /** Queue an in-band `refresh`; returns its authVersion. */
  refresh(refreshToken: string, retryKey: string | null = null, user: User = UNKNOWN): number {
    const frame: Record<string, unknown> = { type: ClientMessageType.REFRESH, refreshToken };
    if (retryKey !== null) frame["retryKey"] = retryKey;
    return this.authFrame(frame, user);
  }

  // ---------------------------------------------------------------- functions

  /** Add a subscription; returns its handle. Sent now if ready, else when ready. */
  subscribe(name: string, args: Record<string, unknown>): number {
    const queryId = this.nextQueryId;
    this.encode({ type: ClientMessageType.SUBSCRIBE, queryId, name, args }); // too large: fail now
    this.nextQueryId += 1;
    const sub: Subscription = { name, args: { ...args }, wire: queryId, sent: false, behind: null };
    this.subscriptions.set(queryId, sub);
    this.wire.set(queryId, queryId);
    if (this.ready && !this.held && this.phase !== "closed") this.sendSubscribe(sub);
    return queryId;
  }

  private sendSubscribe(sub: Subscription): void {
    this.outbox.push(
      this.encode({
        type: ClientMessageType.SUBSCRIBE,
        queryId: sub.wire,
        name: sub.name,
        args: sub.args,
      }),
    );
    sub.sent = true;
    sub.behind = this.pendingAuth.has(this.authVersion) ? this.authVersion : null;
  }

  private sendUnsubscribe(wire: number): void {
    this.outbox.push(this.encode({ type: ClientMessageType.UNSUBSCRIBE, queryId: wire }));
  }

  /** Drop a subscription; `unsubscribe` goes out only if the server has it. */
  unsubscribe(queryId: number): void {
    const sub = this.subscriptions.get(queryId);
    if (sub === undefined) return;
    this.subscriptions.delete(queryId);
    this.wire.delete(sub.wire);
    if (sub.sent && this.phase !== "closed") this.sendUnsubscribe(sub.wire);
  }

  /**
   * Add a mutation issued under `user`; returns its `requestId`. Sent now if ready and the
   * connection runs as `user`, else when it does. `requestId`: re-send one whose outcome the
   * caller did not learn (same function name), instead of taking a new id.
   */
  mutate(name: string, args: Record<string, unknown>, user: User = UNBOUND, requestId?: number): number {
    if (requestId !== undefined) {
      if (!Number.isSafeInteger(requestId) || requestId < 0) {
        throw new RangeError(`requestId must be an integer in [0, 2**53 - 1]: ${requestId}`);
      }
      const pending = this.mutations.get(requestId);
      if (pending !== undefined) {
        if (pending.name !== name) {
          throw new TetherError(
            ErrorCode.BAD_MESSAGE,
            `requestId ${requestId} is pending for ${pending.name}, not ${name}`,
          );
        }
        return requestId;
      }
    }
    const rid = requestId ?? this.nextRequestId;
    const frame = this.encode({ type: ClientMessageType.MUTATE, requestId: rid, name, args });
    if (requestId === undefined) this.nextRequestId += 1;
    this.mutations.set(rid, {
      name,
      frame,
      user,
      sent: false,
      epoch: 0,
      attempt: 0,
      retryAt: null,
    });
    if (this.ready && !this.held && this.phase !== "closed") this.sendMutations();
    return rid;
  }

  /** Stop tracking a mutation (its caller gave up); it is not sent again. */
  forgetMutation(requestId: number): void {
    this.mutations.delete(requestId);
  }

  /**
   * The client signed out (or its token source has no user any more): fail every pending
   * mutation issued under a user, or before the user was known, with `unauthenticated`.
   */
  abandonUserMutations(): CoreEvent[] {
    const events: CoreEvent[] = [];
    for (const [requestId, mutation] of [...this.mutations]) {
      if (mutation.user !== null) {
        this.mutations.delete(requestId);
        events.push({
          type: "mutation_done",
          requestId,
          error: { code: ErrorCode.UNAUTHENTICATED, message: USER_CHANGED_MESSAGE },
        });
      }
    }
    return events;
  }

  /** Queue `ping`. */
  ping(): void {
    if (this.phase === "closed") throw new Error("not connected");
    this.outbox.push(JSON.stringify({ type: ClientMessageType.PING }));
  }

  /** Throw if the state breaks an invariant (for tests). */
  validate(): void {
    const check = (ok: boolean, what: string): void => {
      if (!ok) throw new Error(`ClientCore invariant broken: ${what}`);
    };
    for (const [requestId, m] of this.mutations) {
      check(requestId >= 0 && requestId <= MAX_SAFE_INT, "requestId in range");
      if (m.sent) {
        check(this.phase !== "closed", "sent on no connection");
        check(m.retryAt === null, "sent while waiting to retry");
        check(m.user !== UNBOUND, "sent before its user was bound");
        check(m.epoch <= this.authVersion, "epoch not past authVersion");
      }
    }
    if (this.phase === "closed") {
      check(this.identity === null && this.pendingAuth.size === 0 && !this.ready, "closed is empty");
      check(!this.lapsed && !this.held, "closed is neither lapsed nor held");
    }
    if (this.identity === null) check(this.identityExpiresAt === null, "no expiry without identity");
    if (this.lapsed) check(this.identity === null, "lapsed while holding an identity");
    for (const [handle, sub] of this.subscriptions) {
      check(this.wire.get(sub.wire) === handle, "wire map matches");
      if (sub.behind !== null) {
        check(sub.sent && this.pendingAuth.has(sub.behind), "behind an unanswered request");
      }
    }
    check(this.wire.size === this.subscriptions.size, "wire map size");
    if (this.pendingAuth.size === 0 && this.presumedUser !== UNKNOWN) {
      const held = this.identity?.userId ?? null;
      check(this.presumedUser === held, "presumed user is the held one");
    }
  }

  // ---------------------------------------------------------------- identity changes

  private resendSentBefore(boundary: number): void {
    for (const m of this.mutations.values()) {
      if (m.sent && m.epoch < boundary) m.sent = false;
    }
  }

  private failOtherUsers(user: string | null, boundary: number): CoreEvent[] {
    const events: CoreEvent[] = [];
    for (const [requestId, m] of [...this.mutations]) {
      if (m.user === UNBOUND || m.user === user) continue;
      if (m.sent && m.epoch >= boundary) continue;
      this.mutations.delete(requestId);
      events.push({
        type: "mutation_done",
        requestId,
        error: { code: ErrorCode.UNAUTHENTICATED, message: USER_CHANGED_MESSAGE },
      });
    }
    return events;
  }

  private checkPipelined(version: number, expected: User): void {
    const behind = [...this.subscriptions.values()].filter((s) => s.behind === version);
    for (const sub of behind) sub.behind = null;
    const actual = this.identity?.userId ?? null;
    const asExpected =
      expected === UNKNOWN || expected === UNBOUND ? actual !== null : actual === expected;
    if (asExpected) return;
    if (version === this.authVersion) this.held = true;
    for (const sub of behind) {
      const handle = this.wire.get(sub.wire)!;
      this.wire.delete(sub.wire);
      this.sendUnsubscribe(sub.wire);
      sub.wire = this.nextQueryId;
      this.nextQueryId += 1;
      this.wire.set(sub.wire, handle);
      sub.sent = false;
    }
  }

  private defer(requestId: number, m: Mutation, code: string): CoreEvent[] {
    if (!m.sent) return [];
    const delay = this.retryBackoff.delay(m.attempt, this.rand());
    m.attempt += 1;
    m.sent = false;
    m.retryAt = this.clock() + delay;
    return [{ type: "mutation_deferred", requestId, code, retryInMs: delay }];
  }

  // ---------------------------------------------------------------- receiving

  /**
   * One frame from the server; returns what it means for the application. Nothing is sent
   * from here: the shell calls {@link flush} once it has handled the events.
   */
  receive(text: string): CoreEvent[] {
    let frame: unknown;
    try {
      frame = JSON.parse(text);
    } catch {
      return [{ type: "unrecognized", text: text.slice(0, 200) }];
    }
    if (typeof frame !== "object" || frame === null || Array.isArray(frame)) {
      return [{ type: "unrecognized", text: text.slice(0, 200) }];
    }
    const f = frame as Record<string, unknown>;
    switch (f["type"]) {
      case ServerMessageType.CONNECTED:
        return this.onConnected(f);
      case ServerMessageType.AUTH_OK:
        return this.onAuthOk(f);
      case ServerMessageType.AUTH_ERROR:
        return this.onAuthError(f);
      case ServerMessageType.AUTH_EXPIRING:
        return this.onAuthExpiring(f);
      case ServerMessageType.AUTH_EXPIRED:
        this.identityEnded();
        return [{ type: "auth_expired", expiresAt: int(f["expiresAt"]) ?? 0, serverTime: int(f["serverTime"]) ?? 0 }];
      case ServerMessageType.SESSION_REVOKED: {
        const sessionId = this.identity?.sessionId ?? null;
        this.identityEnded();
        return [{ type: "session_revoked", reason: String(f["reason"] ?? "revoked"), sessionId }];
      }
      case ServerMessageType.TRANSITION:
        return this.onTransition(f);
      case ServerMessageType.MUTATION_RESULT:
        return this.onMutationResult(f);
      case ServerMessageType.ERROR:
        return this.onError(f);
      case ServerMessageType.PONG:
        return [{ type: "pong", serverTime: int(f["serverTime"]) ?? 0 }];
      default:
        return [{ type: "unrecognized", text: text.slice(0, 200) }];
    }
  }

  private onConnected(f: Record<string, unknown>): CoreEvent[] {
    this.phase = "connected";
    this.connectionId = String(f["connectionId"] ?? "");
    return [
      {
        type: "connected",
        connectionId: this.connectionId,
        serverTime: int(f["serverTime"]) ?? 0,
        protocol: int(f["protocol"]) ?? 0,
      },
    ];
  }

  private takeExpected(version: number): User {
    const expected = this.pendingAuth.has(version) ? this.pendingAuth.get(version)! : UNKNOWN;
    this.pendingAuth.delete(version);
    return expected;
  }

  private onAuthOk(f: Record<string, unknown>): CoreEvent[] {
    const version = int(f["authVersion"]) ?? 0;
    const expected = this.takeExpected(version);
    const raw = f["identity"];
    const identity: Identity | null =
      typeof raw === "object" && raw !== null
        ? {
            userId: String((raw as Record<string, unknown>)["userId"]),
            sessionId: String((raw as Record<string, unknown>)["sessionId"]),
          }
        : null;
    const expiresAt = int(f["expiresAt"]);
    const old = this.identity;
    this.identity = identity;
    this.identityExpiresAt = identity !== null ? expiresAt : null;
    this.lapsed = false;
    if (!sameIdentity(old, identity)) this.resendSentBefore(version);
    this.checkPipelined(version, expected);
    const tokens = f["tokens"];
    const events: CoreEvent[] = [
      {
        type: "auth_ok",
        authVersion: version,
        identity,
        expiresAt,
        serverTime: int(f["serverTime"]) ?? 0,
        tokens: typeof tokens === "object" && tokens !== null ? (tokens as MintedTokens) : null,
      },
    ];
    if (version === this.authVersion) {
      const user = identity?.userId ?? null;
      this.presumedUser = user;
      events.push(...this.failOtherUsers(user, version));
    }
    return events;
  }

  private onAuthError(f: Record<string, unknown>): CoreEvent[] {
    const version = int(f["authVersion"]) ?? 0;
    const expected = this.takeExpected(version);
    const code = String(f["code"]);
    if (!IDENTITY_KEEPING_AUTH_CODES.has(code)) {
      // "the connection is now anonymous"; unavailable/rate_limited keep it (rule 2)
      if (this.identity !== null) this.resendSentBefore(version);
      this.identity = null;
      this.identityExpiresAt = null;
      this.lapsed = false;
    }
    if (version === this.authVersion) this.presumedUser = this.identity?.userId ?? null;
    this.checkPipelined(version, expected);
    return [{ type: "auth_failed", authVersion: version, code, message: String(f["message"] ?? "") }];
  }

  private identityEnded(): void {
    if (this.identity !== null) {
      const boundary =
        this.pendingAuth.size > 0 ? Math.min(...this.pendingAuth.keys()) : this.authVersion + 1;
      this.resendSentBefore(boundary);
    }
    this.identity = null;
    this.identityExpiresAt = null;
    this.lapsed = true;
    if (this.pendingAuth.size === 0) this.presumedUser = null;
  }

  private onAuthExpiring(f: Record<string, unknown>): CoreEvent[] {
    const expiresAt = int(f["expiresAt"]);
    if (expiresAt === null || this.identity === null || expiresAt !== this.identityExpiresAt) {
      return []; // about an identity the connection no longer holds
    }
    return [{ type: "auth_expiring", expiresAt, serverTime: int(f["serverTime"]) ?? 0 }];
  }

  private onTransition(f: Record<string, unknown>): CoreEvent[] {
    const version = int(f["version"]) ?? 0;
    this.version = Math.max(this.version, version);
    const events: CoreEvent[] = [];
    const updates = Array.isArray(f["updates"]) ? (f["updates"] as unknown[]) : [];
    for (const update of updates) {
      if (typeof update !== "object" || update === null) continue;
      const u = update as Record<string, unknown>;
      const wire = int(u["queryId"]);
      const queryId = wire !== null ? this.wire.get(wire) : undefined;
      if (queryId === undefined) continue; // unsubscribed meanwhile, or moved
      const error = u["error"];
      if (typeof error === "object" && error !== null) {
        events.push({ type: "query_update", queryId, version, error: wireError(error as Record<string, unknown>) });
      } else {
        events.push({ type: "query_update", queryId, version, value: u["value"] });
      }
    }
    return events;
  }

  private onMutationResult(f: Record<string, unknown>): CoreEvent[] {
    const requestId = int(f["requestId"]);
    const m = requestId !== null ? this.mutations.get(requestId) : undefined;
    if (requestId === null || m === undefined) return []; // a duplicate, or given up
    const error = f["error"];
    if (typeof error === "object" && error !== null) {
      const e = wireError(error as Record<string, unknown>);
      if (RETRY_MUTATION_CODES.has(e.code)) return this.defer(requestId, m, e.code);
      if (e.code === ErrorCode.UNAUTHENTICATED && typeof m.user === "string" && this.identity === null) {
        // Sent for its user, answered while the connection has no identity: nothing was
        // written for its user. It goes out again once the connection is that user again.
        m.sent = false;
        return [];
      }
      this.mutations.delete(requestId);
      return [{ type: "mutation_done", requestId, error: e }];
    }
    this.mutations.delete(requestId);
    const version = int(f["version"]);
    if (version !== null) this.version = Math.max(this.version, version);
    return [
      version !== null
        ? { type: "mutation_done", requestId, value: f["value"], version }
        : { type: "mutation_done", requestId, value: f["value"] },
    ];
  }

  private onError(f: Record<string, unknown>): CoreEvent[] {
    const code = String(f["code"]);
    const message = String(f["message"] ?? "");
    const wire = int(f["queryId"]);
    const requestId = int(f["requestId"]);
    const queryId = wire !== null ? this.wire.get(wire) : undefined;
    if (wire !== null && queryId !== undefined) {
      this.wire.delete(wire);
      this.subscriptions.delete(queryId);
      return [{ type: "query_rejected", queryId, code, message }];
    }
    const m = requestId !== null ? this.mutations.get(requestId) : undefined;
    if (requestId !== null && m !== undefined) {
      if (RETRY_MUTATION_CODES.has(code)) return this.defer(requestId, m, code);
      this.mutations.delete(requestId);
      return [{ type: "mutation_done", requestId, error: { code, message } }];
    }
    return [{ type: "server_error", code, message }];
  }
}
