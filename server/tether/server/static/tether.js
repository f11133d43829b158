var __defProp = Object.defineProperty;
var __defNormalProp = (obj, key, value) => key in obj ? __defProp(obj, key, { enumerable: true, configurable: true, writable: true, value }) : obj[key] = value;
var __publicField = (obj, key, value) => __defNormalProp(obj, typeof key !== "symbol" ? key + "" : key, value);

// src/protocol.ts
var PROTOCOL_VERSION = 1;
var MAX_SAFE_INT = Number.MAX_SAFE_INTEGER;
var DEFAULT_MAX_MESSAGE_BYTES = 65536;
var ClientMessageType = {
  CONNECT: "connect",
  AUTHENTICATE: "authenticate",
  REFRESH: "refresh",
  SUBSCRIBE: "subscribe",
  UNSUBSCRIBE: "unsubscribe",
  MUTATE: "mutate",
  PING: "ping"
};
var ServerMessageType = {
  CONNECTED: "connected",
  AUTH_OK: "auth_ok",
  AUTH_ERROR: "auth_error",
  AUTH_EXPIRING: "auth_expiring",
  AUTH_EXPIRED: "auth_expired",
  SESSION_REVOKED: "session_revoked",
  TRANSITION: "transition",
  MUTATION_RESULT: "mutation_result",
  ERROR: "error",
  PONG: "pong"
};
var AuthErrorCode = {
  INVALID_TOKEN: "invalid_token",
  TOKEN_EXPIRED: "token_expired",
  SESSION_REVOKED: "session_revoked",
  REFRESH_INVALID: "refresh_invalid",
  REFRESH_REUSED: "refresh_reused",
  RATE_LIMITED: "rate_limited",
  UNAVAILABLE: "unavailable",
  INVALID_CREDENTIALS: "invalid_credentials",
  INVALID_REQUEST: "invalid_request",
  EMAIL_TAKEN: "email_taken"
};
var ErrorCode = {
  BAD_MESSAGE: "bad_message",
  UNKNOWN_TYPE: "unknown_type",
  NOT_CONNECTED: "not_connected",
  UNKNOWN_FUNCTION: "unknown_function",
  BAD_ARGS: "bad_args",
  DUPLICATE_QUERY_ID: "duplicate_query_id",
  LIMIT_EXCEEDED: "limit_exceeded",
  RATE_LIMITED: "rate_limited",
  INTERNAL: "internal",
  UNAUTHENTICATED: "unauthenticated",
  UNAVAILABLE: "unavailable"
};
var ClientErrorCode = {
  NETWORK: "network",
  OUTCOME_UNKNOWN: "outcome_unknown",
  CLOSED: "closed",
  MESSAGE_TOO_LARGE: "message_too_large"
};
var CloseCode = {
  NORMAL: 1e3,
  GOING_AWAY: 1001,
  ABNORMAL: 1006,
  MESSAGE_TOO_BIG: 1009,
  INTERNAL_ERROR: 1011,
  SERVICE_RESTART: 1012,
  SLOW_CONSUMER: 4008,
  HEARTBEAT_TIMEOUT: 4009,
  RATE_LIMITED: 4429,
  PROTOCOL_VIOLATION: 4500,
  UNSUPPORTED_PROTOCOL: 4503
};
function closeDecision(code) {
  if (code === CloseCode.SERVICE_RESTART) return "reconnect_now";
  if (code !== null && code >= 4500 && code <= 4999) return "stop";
  return "reconnect";
}
function classifyAuthCode(code) {
  switch (code) {
    case AuthErrorCode.TOKEN_EXPIRED:
    case AuthErrorCode.INVALID_TOKEN:
      return "new_token";
    case AuthErrorCode.REFRESH_INVALID:
    case AuthErrorCode.REFRESH_REUSED:
    case AuthErrorCode.SESSION_REVOKED:
      return "session_ended";
    default:
      return "passing";
  }
}
var IDENTITY_KEEPING_AUTH_CODES = /* @__PURE__ */ new Set([
  AuthErrorCode.UNAVAILABLE,
  AuthErrorCode.RATE_LIMITED
]);
var RETRY_MUTATION_CODES = /* @__PURE__ */ new Set([
  ErrorCode.UNAVAILABLE,
  ErrorCode.RATE_LIMITED
]);

// src/reconnect.ts
var Backoff = class {
  constructor(initialMs = 100, maximumMs = 16e3) {
    __publicField(this, "initialMs", initialMs);
    __publicField(this, "maximumMs", maximumMs);
  }
  /** The longest wait of attempt `attempt` (0-based). */
  ceiling(attempt) {
    if (attempt >= 64) return this.maximumMs;
    return Math.min(this.maximumMs, this.initialMs * 2 ** attempt);
  }
  /** The wait of attempt `attempt` for a uniform `rand` in `[0, 1)`. */
  delay(attempt, rand) {
    return rand * this.ceiling(attempt);
  }
};
var DEFAULT_MUTATION_RETRY_BACKOFF = new Backoff(100, 5e3);
var Reconnector = class {
  constructor(backoff = new Backoff(), rand = Math.random, stableAfterMs = 1e4) {
    __publicField(this, "backoff", backoff);
    __publicField(this, "rand", rand);
    __publicField(this, "stableAfterMs", stableAfterMs);
    __publicField(this, "attempt", 0);
    __publicField(this, "connectedAt", null);
  }
  /** The server answered `connect` at `now` (ms, any monotonic clock). */
  connected(now) {
    this.connectedAt = now;
  }
  /** The connection closed with `closeCode` (`null`: it never opened) at `now`. */
  plan(closeCode, now) {
    if (this.connectedAt !== null && now - this.connectedAt >= this.stableAfterMs) {
      this.attempt = 0;
    }
    this.connectedAt = null;
    const decision = closeDecision(closeCode);
    if (decision !== "reconnect") return { decision, delayMs: 0, closeCode };
    const delayMs = this.backoff.delay(this.attempt, this.rand());
    this.attempt += 1;
    return { decision, delayMs, closeCode };
  }
  /** Something changed (the page came back online or into view): the next try is quick. */
  reset() {
    this.attempt = 0;
  }
};
var DEFAULT_RENEWAL_MARGIN_MS = 3e4;
function renewalDue(expiresAt, serverTime, receivedAt, marginMs = DEFAULT_RENEWAL_MARGIN_MS) {
  const lifetime = Math.max(expiresAt - serverTime, 0);
  const skew = serverTime - receivedAt;
  return expiresAt - skew - Math.min(marginMs, lifetime / 4);
}
function localExpiry(expiresAt, serverTime, receivedAt) {
  return expiresAt - (serverTime - receivedAt);
}

// src/errors.ts
var TetherError = class extends Error {
  constructor(code, message, requestId, retryAfter) {
    super(message);
    __publicField(this, "code", code);
    __publicField(this, "requestId", requestId);
    __publicField(this, "retryAfter", retryAfter);
    __publicField(this, "name", "TetherError");
  }
};

// src/core.ts
var UNBOUND = /* @__PURE__ */ Symbol("unbound");
var UNKNOWN = /* @__PURE__ */ Symbol("unknown");
var REQUEST_IDS_PER_MS = 1024;
function initialRequestId(nowMs) {
  return Math.min(Math.floor(nowMs) * REQUEST_IDS_PER_MS, MAX_SAFE_INT - 2 ** 32);
}
var USER_CHANGED_MESSAGE = "the client's user changed (or signed out) before this mutation had an outcome; it was not sent under the new identity (if it had been sent before, it may have been applied)";
function int(value) {
  return typeof value === "number" && Number.isInteger(value) ? value : null;
}
function sameIdentity(a, b) {
  if (a === null || b === null) return a === b;
  return a.userId === b.userId && a.sessionId === b.sessionId;
}
function wireError(raw) {
  return { code: String(raw["code"]), message: String(raw["message"] ?? "") };
}
var encoder = new TextEncoder();
function tokenSubject(token) {
  const claims = decodeJwtPayload(token);
  const sub = claims?.["sub"];
  return typeof sub === "string" ? sub : UNKNOWN;
}
function decodeJwtPayload(token) {
  const parts = token.split(".");
  if (parts.length !== 3) return null;
  try {
    const b64 = parts[1].replace(/-/g, "+").replace(/_/g, "/");
    const padded = b64 + "=".repeat((4 - b64.length % 4) % 4);
    const bytes = Uint8Array.from(atob(padded), (c) => c.charCodeAt(0));
    const claims = JSON.parse(new TextDecoder().decode(bytes));
    return typeof claims === "object" && claims !== null && !Array.isArray(claims) ? claims : null;
  } catch {
    return null;
  }
}
var ClientCore = class {
  constructor(clientId, options = {}) {
    __publicField(this, "clientId");
    __publicField(this, "maxMessageBytes");
    __publicField(this, "retryBackoff");
    __publicField(this, "protocol");
    __publicField(this, "clock");
    __publicField(this, "rand");
    __publicField(this, "phase", "closed");
    __publicField(this, "ready", false);
    __publicField(this, "connectionId", null);
    /** The last authVersion sent; the next is larger, on any connection. */
    __publicField(this, "authVersion", 0);
    /** authVersion → the user that request is expected to establish, while unanswered. */
    __publicField(this, "pendingAuth", /* @__PURE__ */ new Map());
    __publicField(this, "identity", null);
    __publicField(this, "identityExpiresAt", null);
    /** The user the server runs the next frame under (rule 1). */
    __publicField(this, "presumedUser", null);
    __publicField(this, "lapsed", false);
    __publicField(this, "held", false);
    /** The highest `version` seen. */
    __publicField(this, "version", 0);
    __publicField(this, "subscriptions", /* @__PURE__ */ new Map());
    __publicField(this, "wire", /* @__PURE__ */ new Map());
    __publicField(this, "mutations", /* @__PURE__ */ new Map());
    __publicField(this, "nextQueryId", 1);
    __publicField(this, "nextRequestId");
    __publicField(this, "outbox", []);
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
  encode(frame) {
    const text = JSON.stringify(frame);
    const size = encoder.encode(text).length;
    if (size > this.maxMessageBytes) {
      throw new TetherError(
        "message_too_large",
        `a frame of ${size} bytes is over the server's limit of ${this.maxMessageBytes}`
      );
    }
    return text;
  }
  /** Frames to send, in order (JSON text); the outbox is empty afterwards. */
  dataToSend() {
    const out = this.outbox;
    this.outbox = [];
    return out;
  }
  // ---------------------------------------------------------------- connection
  /** A socket is open: queue `connect`. */
  connectionOpened() {
    this.phase = "opening";
    this.ready = false;
    this.held = false;
    this.lapsed = false;
    this.presumedUser = null;
    this.outbox = [
      this.encode({
        type: ClientMessageType.CONNECT,
        clientId: this.clientId,
        protocol: this.protocol
      })
    ];
  }
  /**
   * The socket is gone. Returns the authVersions that will never be answered. Subscriptions
   * and unacknowledged mutations are kept, unsent: they go out again on the next connection.
   */
  connectionLost() {
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
  pipeline() {
    if (this.phase === "closed") throw new Error("not connected");
    this.ready = true;
    this.held = false;
    this.flush();
  }
  /** Let operations flow (`true`) or hold new ones (`false`). */
  setReady(ready) {
    if (ready && this.phase === "closed") throw new Error("not connected");
    this.ready = ready;
    if (ready) this.flush();
  }
  /** The shell settled the identity without a new auth request: what a gap held may go out. */
  identitySettled() {
    this.held = false;
    this.flush();
  }
  /** While ready and not held, send what is due. */
  flush() {
    if (!this.ready || this.held || this.phase === "closed") return;
    for (const sub of this.subscriptions.values()) {
      if (!sub.sent) this.sendSubscribe(sub);
    }
    this.sendMutations();
  }
  sendMutations() {
    const presumed = this.presumedUser;
    if (presumed === UNKNOWN || this.pendingAuth.size > 0 || this.lapsed) return;
    const now = this.clock();
    for (const mutation of this.mutations.values()) {
      if (mutation.sent || mutation.retryAt !== null && now < mutation.retryAt) continue;
      if (mutation.user === UNBOUND) mutation.user = presumed;
      if (mutation.user !== presumed) continue;
      this.outbox.push(mutation.frame);
      mutation.sent = true;
      mutation.epoch = this.authVersion;
      mutation.retryAt = null;
    }
  }
  /** The earliest time (`clock`) a deferred mutation may go out again; `null` if none waits. */
  nextRetryAt() {
    let earliest = null;
    for (const m of this.mutations.values()) {
      if (!m.sent && m.retryAt !== null && (earliest === null || m.retryAt < earliest)) {
        earliest = m.retryAt;
      }
    }
    return earliest;
  }
  // ---------------------------------------------------------------- auth
  authFrame(frame, user) {
    if (this.phase === "closed") throw new Error("not connected");
    const version = this.authVersion + 1;
    const text = this.encode({ ...frame, authVersion: version });
    this.authVersion = version;
    this.pendingAuth.set(version, user);
    this.presumedUser = user;
    this.outbox.push(text);
    this.held = false;
    this.flush();
    return version;
  }
  /** Queue `authenticate` (`null`: become anonymous); returns its authVersion. */
  authenticate(token, user = UNKNOWN) {
    return this.authFrame(
      { type: ClientMessageType.AUTHENTICATE, token },
      token === null ? null : user
    );
  }
  /** Queue an in-band `refresh`; returns its authVersion. */
  refresh(refreshToken, retryKey = null, user = UNKNOWN) {
    const frame = { type: ClientMessageType.REFRESH, refreshToken };
    if (retryKey !== null) frame["retryKey"] = retryKey;
    return this.authFrame(frame, user);
  }
  // ---------------------------------------------------------------- functions
  /** Add a subscription; returns its handle. Sent now if ready, else when ready. */
  subscribe(name, args) {
    const queryId = this.nextQueryId;
    this.encode({ type: ClientMessageType.SUBSCRIBE, queryId, name, args });
    this.nextQueryId += 1;
    const sub = { name, args: { ...args }, wire: queryId, sent: false, behind: null };
    this.subscriptions.set(queryId, sub);
    this.wire.set(queryId, queryId);
    if (this.ready && !this.held && this.phase !== "closed") this.sendSubscribe(sub);
    return queryId;
  }
  sendSubscribe(sub) {
    this.outbox.push(
      this.encode({
        type: ClientMessageType.SUBSCRIBE,
        queryId: sub.wire,
        name: sub.name,
        args: sub.args
      })
    );
    sub.sent = true;
    sub.behind = this.pendingAuth.has(this.authVersion) ? this.authVersion : null;
  }
  sendUnsubscribe(wire) {
    this.outbox.push(this.encode({ type: ClientMessageType.UNSUBSCRIBE, queryId: wire }));
  }
  /** Drop a subscription; `unsubscribe` goes out only if the server has it. */
  unsubscribe(queryId) {
    const sub = this.subscriptions.get(queryId);
    if (sub === void 0) return;
    this.subscriptions.delete(queryId);
    this.wire.delete(sub.wire);
    if (sub.sent && this.phase !== "closed") this.sendUnsubscribe(sub.wire);
  }
  /**
   * Add a mutation issued under `user`; returns its `requestId`. Sent now if ready and the
   * connection runs as `user`, else when it does. `requestId`: re-send one whose outcome the
   * caller did not learn (same function name), instead of taking a new id.
   */
  mutate(name, args, user = UNBOUND, requestId) {
    if (requestId !== void 0) {
      if (!Number.isSafeInteger(requestId) || requestId < 0) {
        throw new RangeError(`requestId must be an integer in [0, 2**53 - 1]: ${requestId}`);
      }
      const pending = this.mutations.get(requestId);
      if (pending !== void 0) {
        if (pending.name !== name) {
          throw new TetherError(
            ErrorCode.BAD_MESSAGE,
            `requestId ${requestId} is pending for ${pending.name}, not ${name}`
          );
        }
        return requestId;
      }
    }
    const rid = requestId ?? this.nextRequestId;
    const frame = this.encode({ type: ClientMessageType.MUTATE, requestId: rid, name, args });
    if (requestId === void 0) this.nextRequestId += 1;
    this.mutations.set(rid, {
      name,
      frame,
      user,
      sent: false,
      epoch: 0,
      attempt: 0,
      retryAt: null
    });
    if (this.ready && !this.held && this.phase !== "closed") this.sendMutations();
    return rid;
  }
  /** Stop tracking a mutation (its caller gave up); it is not sent again. */
  forgetMutation(requestId) {
    this.mutations.delete(requestId);
  }
  /**
   * The client signed out (or its token source has no user any more): fail every pending
   * mutation issued under a user, or before the user was known, with `unauthenticated`.
   */
  abandonUserMutations() {
    const events = [];
    for (const [requestId, mutation] of [...this.mutations]) {
      if (mutation.user !== null) {
        this.mutations.delete(requestId);
        events.push({
          type: "mutation_done",
          requestId,
          error: { code: ErrorCode.UNAUTHENTICATED, message: USER_CHANGED_MESSAGE }
        });
      }
    }
    return events;
  }
  /** Queue `ping`. */
  ping() {
    if (this.phase === "closed") throw new Error("not connected");
    this.outbox.push(JSON.stringify({ type: ClientMessageType.PING }));
  }
  /** Throw if the state breaks an invariant (for tests). */
  validate() {
    const check = (ok, what) => {
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
  resendSentBefore(boundary) {
    for (const m of this.mutations.values()) {
      if (m.sent && m.epoch < boundary) m.sent = false;
    }
  }
  failOtherUsers(user, boundary) {
    const events = [];
    for (const [requestId, m] of [...this.mutations]) {
      if (m.user === UNBOUND || m.user === user) continue;
      if (m.sent && m.epoch >= boundary) continue;
      this.mutations.delete(requestId);
      events.push({
        type: "mutation_done",
        requestId,
        error: { code: ErrorCode.UNAUTHENTICATED, message: USER_CHANGED_MESSAGE }
      });
    }
    return events;
  }
  checkPipelined(version, expected) {
    const behind = [...this.subscriptions.values()].filter((s) => s.behind === version);
    for (const sub of behind) sub.behind = null;
    const actual = this.identity?.userId ?? null;
    const asExpected = expected === UNKNOWN || expected === UNBOUND ? actual !== null : actual === expected;
    if (asExpected) return;
    if (version === this.authVersion) this.held = true;
    for (const sub of behind) {
      const handle = this.wire.get(sub.wire);
      this.wire.delete(sub.wire);
      this.sendUnsubscribe(sub.wire);
      sub.wire = this.nextQueryId;
      this.nextQueryId += 1;
      this.wire.set(sub.wire, handle);
      sub.sent = false;
    }
  }
  defer(requestId, m, code) {
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
  receive(text) {
    let frame;
    try {
      frame = JSON.parse(text);
    } catch {
      return [{ type: "unrecognized", text: text.slice(0, 200) }];
    }
    if (typeof frame !== "object" || frame === null || Array.isArray(frame)) {
      return [{ type: "unrecognized", text: text.slice(0, 200) }];
    }
    const f = frame;
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
  onConnected(f) {
    this.phase = "connected";
    this.connectionId = String(f["connectionId"] ?? "");
    return [
      {
        type: "connected",
        connectionId: this.connectionId,
        serverTime: int(f["serverTime"]) ?? 0,
        protocol: int(f["protocol"]) ?? 0
      }
    ];
  }
  takeExpected(version) {
    const expected = this.pendingAuth.has(version) ? this.pendingAuth.get(version) : UNKNOWN;
    this.pendingAuth.delete(version);
    return expected;
  }
  onAuthOk(f) {
    const version = int(f["authVersion"]) ?? 0;
    const expected = this.takeExpected(version);
    const raw = f["identity"];
    const identity = typeof raw === "object" && raw !== null ? {
      userId: String(raw["userId"]),
      sessionId: String(raw["sessionId"])
    } : null;
    const expiresAt = int(f["expiresAt"]);
    const old = this.identity;
    this.identity = identity;
    this.identityExpiresAt = identity !== null ? expiresAt : null;
    this.lapsed = false;
    if (!sameIdentity(old, identity)) this.resendSentBefore(version);
    this.checkPipelined(version, expected);
    const tokens = f["tokens"];
    const events = [
      {
        type: "auth_ok",
        authVersion: version,
        identity,
        expiresAt,
        serverTime: int(f["serverTime"]) ?? 0,
        tokens: typeof tokens === "object" && tokens !== null ? tokens : null
      }
    ];
    if (version === this.authVersion) {
      const user = identity?.userId ?? null;
      this.presumedUser = user;
      events.push(...this.failOtherUsers(user, version));
    }
    return events;
  }
  onAuthError(f) {
    const version = int(f["authVersion"]) ?? 0;
    const expected = this.takeExpected(version);
    const code = String(f["code"]);
    if (!IDENTITY_KEEPING_AUTH_CODES.has(code)) {
      if (this.identity !== null) this.resendSentBefore(version);
      this.identity = null;
      this.identityExpiresAt = null;
      this.lapsed = false;
    }
    if (version === this.authVersion) this.presumedUser = this.identity?.userId ?? null;
    this.checkPipelined(version, expected);
    return [{ type: "auth_failed", authVersion: version, code, message: String(f["message"] ?? "") }];
  }
  identityEnded() {
    if (this.identity !== null) {
      const boundary = this.pendingAuth.size > 0 ? Math.min(...this.pendingAuth.keys()) : this.authVersion + 1;
      this.resendSentBefore(boundary);
    }
    this.identity = null;
    this.identityExpiresAt = null;
    this.lapsed = true;
    if (this.pendingAuth.size === 0) this.presumedUser = null;
  }
  onAuthExpiring(f) {
    const expiresAt = int(f["expiresAt"]);
    if (expiresAt === null || this.identity === null || expiresAt !== this.identityExpiresAt) {
      return [];
    }
    return [{ type: "auth_expiring", expiresAt, serverTime: int(f["serverTime"]) ?? 0 }];
  }
  onTransition(f) {
    const version = int(f["version"]) ?? 0;
    this.version = Math.max(this.version, version);
    const events = [];
    const updates = Array.isArray(f["updates"]) ? f["updates"] : [];
    for (const update of updates) {
      if (typeof update !== "object" || update === null) continue;
      const u = update;
      const wire = int(u["queryId"]);
      const queryId = wire !== null ? this.wire.get(wire) : void 0;
      if (queryId === void 0) continue;
      const error = u["error"];
      if (typeof error === "object" && error !== null) {
        events.push({ type: "query_update", queryId, version, error: wireError(error) });
      } else {
        events.push({ type: "query_update", queryId, version, value: u["value"] });
      }
    }
    return events;
  }
  onMutationResult(f) {
    const requestId = int(f["requestId"]);
    const m = requestId !== null ? this.mutations.get(requestId) : void 0;
    if (requestId === null || m === void 0) return [];
    const error = f["error"];
    if (typeof error === "object" && error !== null) {
      const e = wireError(error);
      if (RETRY_MUTATION_CODES.has(e.code)) return this.defer(requestId, m, e.code);
      if (e.code === ErrorCode.UNAUTHENTICATED && typeof m.user === "string" && this.identity === null) {
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
      version !== null ? { type: "mutation_done", requestId, value: f["value"], version } : { type: "mutation_done", requestId, value: f["value"] }
    ];
  }
  onError(f) {
    const code = String(f["code"]);
    const message = String(f["message"] ?? "");
    const wire = int(f["queryId"]);
    const requestId = int(f["requestId"]);
    const queryId = wire !== null ? this.wire.get(wire) : void 0;
    if (wire !== null && queryId !== void 0) {
      this.wire.delete(wire);
      this.subscriptions.delete(queryId);
      return [{ type: "query_rejected", queryId, code, message }];
    }
    const m = requestId !== null ? this.mutations.get(requestId) : void 0;
    if (requestId !== null && m !== void 0) {
      if (RETRY_MUTATION_CODES.has(code)) return this.defer(requestId, m, code);
      this.mutations.delete(requestId);
      return [{ type: "mutation_done", requestId, error: { code, message } }];
    }
    return [{ type: "server_error", code, message }];
  }
};

// src/browser.ts
var DEFAULT_HTTP_TIMEOUT_MS = 1e4;
function httpBaseUrl(syncUrl) {
  const url = new URL(syncUrl);
  if (url.protocol === "ws:") url.protocol = "http:";
  else if (url.protocol === "wss:") url.protocol = "https:";
  let path = url.pathname.replace(/\/+$/, "");
  if (path.endsWith("/sync")) path = path.slice(0, -"/sync".length);
  return `${url.protocol}//${url.host}${path}`;
}
function defaultSyncUrl() {
  const location = globalThis.location;
  if (location === void 0) throw new TypeError("no page location: pass `url`");
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}/sync`;
}
var FetchAuthHttp = class {
  constructor(baseUrl, cookie, fetchImpl = globalThis.fetch.bind(globalThis), timeoutMs = DEFAULT_HTTP_TIMEOUT_MS) {
    __publicField(this, "baseUrl", baseUrl);
    __publicField(this, "cookie", cookie);
    __publicField(this, "fetchImpl", fetchImpl);
    __publicField(this, "timeoutMs", timeoutMs);
  }
  signIn(email, password, cookie) {
    return this.tokens("/auth/signin", { email, password, ...cookie ? { cookie: true } : {} });
  }
  signUp(email, password, cookie) {
    return this.tokens("/auth/signup", { email, password, ...cookie ? { cookie: true } : {} });
  }
  refresh(refreshToken, retryKey) {
    const body = refreshToken === null ? { cookie: true } : { refreshToken };
    if (retryKey !== null) body["retryKey"] = retryKey;
    return this.tokens("/auth/refresh", body);
  }
  async signOut(accessToken, everywhere) {
    await this.post(everywhere ? "/auth/signout-all" : "/auth/signout", null, accessToken);
  }
  async tokens(path, body) {
    const data = await this.post(path, body, null);
    if (typeof data !== "object" || data === null || typeof data.accessToken !== "string" || typeof data.expiresAt !== "number") {
      throw new TetherError("unavailable", `${path} answered without tokens`);
    }
    return data;
  }
  async post(path, body, bearer) {
    const headers = {};
    if (body !== null) headers["Content-Type"] = "application/json";
    if (bearer !== null) headers["Authorization"] = `Bearer ${bearer}`;
    if (this.cookie) headers["Tether-CSRF"] = "1";
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), this.timeoutMs);
    let response;
    try {
      response = await this.fetchImpl(this.baseUrl + path, {
        method: "POST",
        headers,
        body: body === null ? null : JSON.stringify(body),
        credentials: this.cookie ? "include" : "same-origin",
        signal: abort.signal
      });
    } catch (error) {
      throw new TetherError("network", `${path}: ${error instanceof Error ? error.message : String(error)}`);
    } finally {
      clearTimeout(timer);
    }
    if (response.status === 204) return null;
    let data = null;
    try {
      data = await response.json();
    } catch {
      data = null;
    }
    if (response.ok) return data;
    const fields = typeof data === "object" && data !== null ? data : {};
    const code = typeof fields["error"] === "string" ? fields["error"] : response.status >= 500 ? "unavailable" : "invalid_request";
    const retryAfter = Number(response.headers.get("Retry-After"));
    throw new TetherError(
      code,
      typeof fields["message"] === "string" ? fields["message"] : `${path}: HTTP ${response.status}`,
      void 0,
      Number.isFinite(retryAfter) && retryAfter > 0 ? retryAfter : void 0
    );
  }
};
var LocalStorageStore = class {
  constructor(key, storage = safeLocalStorage()) {
    __publicField(this, "key", key);
    __publicField(this, "storage", storage);
    __publicField(this, "memory", null);
  }
  load() {
    if (this.storage === null) return this.memory;
    try {
      const raw = this.storage.getItem(this.key);
      if (raw === null) return null;
      const value = JSON.parse(raw);
      return typeof value === "object" && value !== null && typeof value.userId === "string" ? value : null;
    } catch {
      return this.memory;
    }
  }
  save(state) {
    this.memory = state;
    if (this.storage === null) return;
    try {
      if (state === null) this.storage.removeItem(this.key);
      else this.storage.setItem(this.key, JSON.stringify(state));
    } catch {
    }
  }
};
function safeLocalStorage() {
  try {
    const storage = globalThis.localStorage;
    return storage ?? null;
  } catch {
    return null;
  }
}
var BroadcastTabChannel = class {
  constructor(name) {
    __publicField(this, "channel");
    this.channel = typeof BroadcastChannel === "function" ? new BroadcastChannel(name) : null;
  }
  post(message) {
    this.channel?.postMessage(message);
  }
  onMessage(listener) {
    this.channel?.addEventListener("message", (event) => {
      const data = event.data;
      if (typeof data === "object" && data !== null && typeof data.type === "string") {
        listener(data);
      }
    });
  }
  close() {
    this.channel?.close();
  }
};
function webLockRunner() {
  const locks = globalThis.navigator?.locks;
  if (locks !== void 0 && typeof locks.request === "function") {
    return (name, fn) => locks.request(name, { mode: "exclusive" }, () => fn());
  }
  return promiseMutex();
}
function promiseMutex() {
  const tails = /* @__PURE__ */ new Map();
  return (name, fn) => {
    const before = tails.get(name) ?? Promise.resolve();
    const run = before.then(fn, fn);
    tails.set(
      name,
      run.then(
        () => void 0,
        () => void 0
      )
    );
    return run;
  };
}
function randomRetryKey() {
  const bytes = new Uint8Array(24);
  crypto.getRandomValues(bytes);
  let text = "";
  for (const b of bytes) text += String.fromCharCode(b);
  return btoa(text).replace(/\+/g, "-").replace(/\//g, "_");
}
function randomClientId() {
  if (typeof crypto.randomUUID === "function") return crypto.randomUUID();
  return randomRetryKey();
}

// src/session.ts
function isFresh(session, now) {
  return now < renewalDue(session.expiresAt, session.serverTime, session.receivedAt);
}
function sessionFrom(response, receivedAt) {
  return {
    userId: response.userId,
    sessionId: response.sessionId,
    accessToken: response.accessToken,
    expiresAt: response.expiresAt,
    serverTime: response.serverTime,
    receivedAt
  };
}
function storedSession(state) {
  if (state === null || state.accessToken === void 0 || state.expiresAt === void 0 || state.serverTime === void 0 || state.receivedAt === void 0) {
    return null;
  }
  return {
    userId: state.userId,
    sessionId: state.sessionId,
    accessToken: state.accessToken,
    expiresAt: state.expiresAt,
    serverTime: state.serverTime,
    receivedAt: state.receivedAt
  };
}
function supersedes(candidate, current) {
  if (current === null) return true;
  if (candidate.sessionId !== current.sessionId) return true;
  return candidate.expiresAt > current.expiresAt;
}
var SessionKeeper = class {
  constructor(mode, env, key) {
    __publicField(this, "mode", mode);
    __publicField(this, "env", env);
    __publicField(this, "key", key);
    __publicField(this, "current", null);
    /** Counts the refreshes this tab made (for the demo's session panel and for tests). */
    __publicField(this, "refreshCount", 0);
    __publicField(this, "renewing", null);
    __publicField(this, "listeners", /* @__PURE__ */ new Set());
    __publicField(this, "lockName");
    this.lockName = `tether-refresh:${key}`;
    env.channel.onMessage((m) => this.onTabMessage(m));
  }
  onChange(listener) {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }
  set(session, reason) {
    this.current = session;
    for (const listener of [...this.listeners]) listener(session, reason);
  }
  /**
   * Read the session the origin already holds at start: in `storage` mode the stored one (its
   * access token may be stale; {@link freshToken} renews it).
   */
  restore() {
    const state = this.env.store.load();
    if (state === null) return null;
    const session = storedSession(state);
    if (session !== null) this.current = session;
    return { userId: state.userId, sessionId: state.sessionId };
  }
  /** Whether the origin has a session (this tab's, or one in the shared store). */
  hasSession() {
    return this.current !== null || this.env.store.load() !== null;
  }
  /** Sign in or up over HTTP; the new session is adopted by every tab. */
  async signIn(kind, email, password) {
    const cookie = this.mode === "cookie";
    const response = kind === "signIn" ? await this.env.http.signIn(email, password, cookie) : await this.env.http.signUp(email, password, cookie);
    const session = sessionFrom(response, this.env.now());
    this.save(session, response.refreshToken ?? void 0);
    this.env.channel.post({ type: "session", session });
    this.set(session, "signed_in");
    return session;
  }
  /**
   * An access token fresh enough to present now; renews first when this tab's is not.
   * `null`: there is no session (any more).
   */
  async freshToken() {
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
  renew(stale) {
    if (this.renewing === null) {
      this.renewing = this.env.lock(this.lockName, () => this.renewLocked(stale)).finally(() => {
        this.renewing = null;
      });
    }
    return this.renewing;
  }
  async renewLocked(stale) {
    const now = this.env.now();
    const state = this.env.store.load();
    const stored = storedSession(state);
    for (const candidate of [this.current, stored]) {
      if (candidate !== null && candidate.accessToken !== stale && isFresh(candidate, now)) {
        if (candidate !== this.current) this.set(candidate, "adopted");
        return candidate;
      }
    }
    if (state === null) {
      if (this.current !== null) this.end("signed_out", false);
      return null;
    }
    if (this.mode === "storage" && state.refreshToken === void 0) {
      this.end("refresh_invalid", true);
      return null;
    }
    const retryKey = state.retryKey ?? this.env.newRetryKey();
    if (state.retryKey === void 0) this.env.store.save({ ...state, retryKey });
    let response;
    try {
      response = await this.env.http.refresh(
        this.mode === "storage" ? state.refreshToken : null,
        retryKey
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
    this.save(session, response.refreshToken ?? void 0);
    this.env.channel.post({ type: "session", session });
    this.set(session, "refreshed");
    return session;
  }
  save(session, refreshToken) {
    const state = {
      userId: session.userId,
      sessionId: session.sessionId,
      accessToken: session.accessToken,
      expiresAt: session.expiresAt,
      serverTime: session.serverTime,
      receivedAt: session.receivedAt
    };
    if (this.mode === "storage") {
      if (typeof refreshToken !== "string") {
        throw new TetherError("invalid_request", "the server returned no refresh token (is it in cookie mode?)");
      }
      state.refreshToken = refreshToken;
    }
    this.env.store.save(state);
  }
  /**
   * Sign out this session on the server, and every tab locally. An access token too old to
   * present (the tab slept past its expiry) is renewed first: the server ends a session only for
   * a valid access token, and the refresh token it would otherwise leave alive is still good.
   */
  async signOut(everywhere) {
    try {
      let session = this.current;
      if ((session === null || !isFresh(session, this.env.now())) && this.hasSession()) {
        session = await this.renew(session?.accessToken ?? null);
      }
      if (session !== null) await this.env.http.signOut(session.accessToken, everywhere);
    } catch (error) {
      if (!(error instanceof TetherError && error.code === "invalid_token")) {
        this.end(everywhere ? "signed_out_everywhere" : "signed_out", true);
        throw error;
      }
    }
    this.end(everywhere ? "signed_out_everywhere" : "signed_out", true);
  }
  /** The session ended (`reason`): forget it in every tab. */
  end(reason, announce) {
    const hadState = this.env.store.load() !== null;
    if (hadState) this.env.store.save(null);
    if (announce) this.env.channel.post({ type: "signed_out", reason });
    if (this.current !== null || hadState) this.set(null, reason);
  }
  /** The local time at which this tab's access token expires, or `null`. */
  localExpiry() {
    const s = this.current;
    return s === null ? null : localExpiry(s.expiresAt, s.serverTime, s.receivedAt);
  }
  onTabMessage(message) {
    switch (message.type) {
      case "session":
        if (supersedes(message.session, this.current)) this.set(message.session, "adopted");
        return;
      case "signed_out":
        if (this.current !== null) this.set(null, message.reason);
        return;
    }
  }
  close() {
    this.env.channel.close();
    this.listeners.clear();
  }
};

// src/client.ts
var SIGNED_OUT = Object.freeze({ state: "signedOut", userId: null, expiresAt: null });
var CLOSE_DEAD_SOCKET = 4e3;
var TetherClient = class {
  constructor(options = {}) {
    __publicField(this, "url");
    __publicField(this, "refreshMode");
    __publicField(this, "core");
    __publicField(this, "keeper");
    __publicField(this, "reconnector");
    __publicField(this, "WebSocketImpl");
    __publicField(this, "pingIntervalMs");
    __publicField(this, "pongTimeoutMs");
    __publicField(this, "openTimeoutMs");
    __publicField(this, "fetchToken", null);
    /** The token `fetchToken` last returned (presented on each new connection). */
    __publicField(this, "externalToken", null);
    __publicField(this, "ws", null);
    /** Increments with every connection attempt; callbacks of older ones are ignored. */
    __publicField(this, "generation", 0);
    __publicField(this, "opening", false);
    __publicField(this, "closed", false);
    __publicField(this, "connState", "connecting");
    /** The access token last presented on the current connection (`null`: none). */
    __publicField(this, "presented", null);
    /** authVersion → the token that request presented, until it is answered. */
    __publicField(this, "authTokens", /* @__PURE__ */ new Map());
    __publicField(this, "authInfo", SIGNED_OUT);
    __publicField(this, "authListeners", /* @__PURE__ */ new Set());
    __publicField(this, "queries", /* @__PURE__ */ new Map());
    __publicField(this, "pending", /* @__PURE__ */ new Map());
    __publicField(this, "renewing", false);
    __publicField(this, "timers", {
      reconnect: null,
      renew: null,
      retry: null,
      ping: null,
      pong: null
    });
    __publicField(this, "detach", []);
    this.url = options.url ?? defaultSyncUrl();
    this.refreshMode = options.refresh ?? "cookie";
    if (this.refreshMode !== "cookie" && this.refreshMode !== "storage") {
      throw new TypeError(`refresh must be "cookie" or "storage", not ${String(this.refreshMode)}`);
    }
    const WS = options.WebSocket ?? globalThis.WebSocket;
    if (WS === void 0) throw new TypeError("no WebSocket implementation: pass `WebSocket`");
    this.WebSocketImpl = WS;
    this.pingIntervalMs = options.pingIntervalMs ?? 25e3;
    this.pongTimeoutMs = options.pongTimeoutMs ?? 1e4;
    this.openTimeoutMs = options.openTimeoutMs ?? 1e4;
    this.core = new ClientCore(randomClientId());
    this.reconnector = new Reconnector(options.backoff ?? new Backoff());
    const base = options.authUrl ?? httpBaseUrl(this.url);
    const key = `tether:${base}`;
    const given = options.sessionEnv ?? {};
    const env = {
      http: given.http ?? new FetchAuthHttp(base, this.refreshMode === "cookie", options.fetch),
      store: given.store ?? new LocalStorageStore(`${key}:${this.refreshMode}`),
      channel: given.channel ?? new BroadcastTabChannel(`${key}:${this.refreshMode}`),
      lock: given.lock ?? webLockRunner(),
      now: given.now ?? (() => Date.now()),
      newRetryKey: given.newRetryKey ?? randomRetryKey
    };
    this.keeper = new SessionKeeper(this.refreshMode, env, key);
    this.keeper.onChange((session, reason) => this.onSessionChange(session, reason));
    const restored = this.keeper.restore();
    if (restored !== null) {
      const s = this.keeper.current;
      this.setAuthInfo({
        state: s !== null && Date.now() < localExpiry(s.expiresAt, s.serverTime, s.receivedAt) ? "signedIn" : "refreshing",
        userId: restored.userId,
        expiresAt: s?.expiresAt ?? null
      });
    }
    this.listenToPage();
    void this.connect();
  }
  // ---------------------------------------------------------------- public surface (§6)
  /** The session as the application sees it. */
  get auth() {
    return this.authInfo;
  }
  /** The socket as the application sees it. */
  get connectionState() {
    return this.connState;
  }
  /** Refreshes this tab made (the other tabs adopt them); for session panels and tests. */
  get refreshCount() {
    return this.keeper.refreshCount;
  }
  onAuthChange(listener) {
    this.authListeners.add(listener);
    return () => {
      this.authListeners.delete(listener);
    };
  }
  async signUp(credentials) {
    return this.signInWith("signUp", credentials);
  }
  async signIn(credentials) {
    return this.signInWith("signIn", credentials);
  }
  async signInWith(kind, { email, password }) {
    this.checkOpen();
    this.fetchToken = null;
    this.externalToken = null;
    await this.keeper.signIn(kind, email, password);
    this.wake(true);
    return this.authInfo;
  }
  /** End this session on the server; every tab of the origin signs out. */
  async signOut() {
    this.checkOpen();
    await this.keeper.signOut(false);
  }
  /** End every session of the user on the server; every tab of the origin signs out. */
  async signOutEverywhere() {
    this.checkOpen();
    await this.keeper.signOut(true);
  }
  /**
   * Use identities issued elsewhere: `fetchToken({ forceRefreshToken })` returns an access JWT
   * (or `null`: no user). It is called when a connection opens, when the server says the token
   * is about to expire (`forceRefreshToken: true`), and once more when a token is refused.
   */
  setAuth(fetchToken) {
    this.checkOpen();
    this.fetchToken = fetchToken;
    this.externalToken = null;
    void this.presentExternal(false);
  }
  /** Call `callback(value, error)` with every new result of query `name(args)`. */
  subscribe(name, args, callback) {
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
  mutate(name, args = {}, options = {}) {
    this.checkOpen();
    let requestId;
    try {
      requestId = this.core.mutate(name, args, this.mutationUser(), options.requestId);
    } catch (error) {
      return Promise.reject(error);
    }
    const promise = new Promise((resolve, reject) => {
      const waiter = { resolve, reject, timer: null };
      if (options.timeoutMs !== void 0) {
        waiter.timer = setTimeout(() => {
          this.dropWaiter(requestId, waiter);
          reject(
            new TetherError(
              ClientErrorCode.OUTCOME_UNKNOWN,
              `no definite answer within ${options.timeoutMs} ms; re-send with this requestId to learn it`,
              requestId
            )
          );
        }, options.timeoutMs);
      }
      const waiters = this.pending.get(requestId);
      if (waiters !== void 0) waiters.push(waiter);
      else this.pending.set(requestId, [waiter]);
    });
    this.pump();
    return promise;
  }
  /** A caller gave up: when none is left, the core stops sending the mutation. */
  dropWaiter(requestId, waiter) {
    const waiters = this.pending.get(requestId);
    if (waiters === void 0) return;
    const rest = waiters.filter((w) => w !== waiter);
    if (rest.length > 0) {
      this.pending.set(requestId, rest);
      return;
    }
    this.pending.delete(requestId);
    this.core.forgetMutation(requestId);
  }
  /** Close the connection for good and stop every timer and listener. */
  close() {
    if (this.closed) return;
    this.closed = true;
    this.generation += 1;
    for (const off of this.detach.splice(0)) off();
    this.clearTimers();
    const ws = this.ws;
    this.ws = null;
    if (ws !== null) ws.close(1e3);
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
  async connect() {
    if (this.closed || this.ws !== null || this.opening) return;
    this.opening = true;
    const gen = ++this.generation;
    if (this.connState === "stopped") this.setConnState("connecting");
    let token;
    try {
      token = await this.tokenForConnect();
    } catch {
      this.opening = false;
      if (gen === this.generation) this.scheduleReconnect(null);
      return;
    }
    if (gen !== this.generation || this.closed) {
      this.opening = false;
      return;
    }
    let ws;
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
      this.present(this.fetchToken !== null ? this.externalToken : this.keeper.current?.accessToken ?? token);
      this.core.pipeline();
      this.pump();
      this.startHeartbeat();
    };
    ws.onmessage = (event) => {
      if (gen !== this.generation) return;
      this.alive();
      if (typeof event.data !== "string") return;
      for (const e of this.core.receive(event.data)) this.handle(e);
      this.core.flush();
      this.pump();
    };
    let ended = false;
    const end = (code) => {
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
      }
    }, this.openTimeoutMs);
    ws.onclose = (event) => end(event.code === 1005 || event.code === 1006 ? null : event.code);
    ws.onerror = () => {
      if (ws.readyState === 1) return;
      end(null);
    };
  }
  async tokenForConnect() {
    const fetchToken = this.fetchToken;
    if (fetchToken !== null) {
      const token = await fetchToken({ forceRefreshToken: false }) ?? null;
      if (fetchToken === this.fetchToken) this.externalToken = token;
      return token;
    }
    return this.keeper.freshToken();
  }
  lost(closeCode) {
    this.ws = null;
    this.authTokens.clear();
    this.stopHeartbeat();
    this.core.connectionLost();
    this.presented = null;
    this.scheduleReconnect(closeCode);
  }
  scheduleReconnect(closeCode) {
    if (this.closed) return;
    const plan = this.reconnector.plan(closeCode, performance.now());
    if (plan.decision === "stop") {
      this.setConnState("stopped");
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
  pump() {
    const ws = this.ws;
    const frames = this.core.dataToSend();
    if (ws === null || ws.readyState !== 1) return;
    for (const frame of frames) ws.send(frame);
    this.scheduleMutationRetry();
  }
  scheduleMutationRetry() {
    const at = this.core.nextRetryAt();
    this.clearTimer("retry");
    if (at === null) return;
    this.timers.retry = setTimeout(
      () => {
        this.timers.retry = null;
        this.core.flush();
        this.pump();
      },
      Math.max(0, at - performance.now())
    );
  }
  // ---------------------------------------------------------------- heartbeat
  startHeartbeat() {
    this.stopHeartbeat();
    this.timers.ping = setInterval(() => this.ping(this.pongTimeoutMs), this.pingIntervalMs);
  }
  stopHeartbeat() {
    this.clearTimer("ping");
    this.clearTimer("pong");
  }
  /** Ping, and drop the socket if nothing at all arrives within `timeoutMs`. */
  ping(timeoutMs) {
    const ws = this.ws;
    if (ws === null || ws.readyState !== 1 || this.core.phase === "closed") return;
    this.core.ping();
    this.pump();
    if (this.timers.pong !== null) return;
    this.timers.pong = setTimeout(() => {
      this.timers.pong = null;
      if (this.ws !== ws) return;
      this.generation += 1;
      this.ws = null;
      try {
        ws.close(CLOSE_DEAD_SOCKET);
      } catch {
      }
      this.lost(null);
    }, timeoutMs);
  }
  alive() {
    this.clearTimer("pong");
  }
  // ---------------------------------------------------------------- frames
  handle(e) {
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
        if (e.authVersion !== this.core.authVersion) return;
        const current = this.fetchToken === null ? this.keeper.current : null;
        if (current !== null && token !== void 0 && token !== current.accessToken) {
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
          this.core.authenticate(null);
        }
        return;
      case "session_revoked": {
        if (this.fetchToken !== null) {
          void this.presentExternal(true);
          return;
        }
        const current = this.keeper.current;
        if (current !== null && current.sessionId !== e.sessionId) {
          this.presented = null;
          this.present(current.accessToken);
          return;
        }
        this.keeper.end(e.reason, true);
        return;
      }
      case "query_update": {
        const cb = this.queries.get(e.queryId);
        if (cb === void 0) return;
        if (e.error !== void 0) cb(void 0, new TetherError(e.error.code, e.error.message));
        else cb(e.value, void 0);
        return;
      }
      case "query_rejected": {
        const cb = this.queries.get(e.queryId);
        this.queries.delete(e.queryId);
        cb?.(void 0, new TetherError(e.code, e.message));
        return;
      }
      case "mutation_done": {
        const waiters = this.pending.get(e.requestId) ?? [];
        this.pending.delete(e.requestId);
        for (const w of waiters) {
          if (w.timer !== null) clearTimeout(w.timer);
          if (e.error !== void 0) w.reject(new TetherError(e.error.code, e.error.message, e.requestId));
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
  onAuthFailed(code) {
    const kind = classifyAuthCode(code);
    if (kind === "passing") {
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
  hasCredentials() {
    return this.fetchToken !== null || this.keeper.hasSession();
  }
  /** Present `token` on the current connection (once per token). */
  present(token) {
    if (this.core.phase === "closed" || token === this.presented) return;
    this.presented = token;
    const user = token === null ? null : tokenSubject(token);
    this.authTokens.set(this.core.authenticate(token, user), token);
    this.pump();
  }
  onSessionChange(session, reason) {
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
  async renew() {
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
  async presentExternal(force, afterRefusal = false) {
    const fetchToken = this.fetchToken;
    if (fetchToken === null) return;
    const refused = afterRefusal ? this.presented : null;
    let token;
    try {
      token = await fetchToken({ forceRefreshToken: force }) ?? null;
    } catch {
      this.retryRenewalSoon();
      return;
    }
    if (fetchToken !== this.fetchToken) return;
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
  scheduleRenewal(expiresAt, serverTime) {
    this.clearTimer("renew");
    const due = renewalDue(expiresAt, serverTime, Date.now());
    this.timers.renew = setTimeout(
      () => {
        this.timers.renew = null;
        void this.renew();
      },
      Math.max(0, due - Date.now())
    );
  }
  retryRenewalSoon() {
    this.clearTimer("renew");
    const delay = 250 + Math.random() * 1750;
    this.timers.renew = setTimeout(() => {
      this.timers.renew = null;
      void this.renew();
    }, delay);
  }
  mutationUser() {
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
  listenToPage() {
    const target = globalThis;
    const doc = globalThis.document;
    const on = (t, type, fn) => {
      if (t?.addEventListener === void 0) return;
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
  wake(resetBackoff) {
    if (this.closed) return;
    if (this.ws === null) {
      if (resetBackoff || this.connState === "stopped" || this.timers.reconnect !== null) {
        this.reconnector.reset();
      }
      this.clearTimer("reconnect");
      void this.connect();
      return;
    }
    this.ping(Math.min(this.pongTimeoutMs, 5e3));
    if (this.fetchToken === null) {
      const s = this.keeper.current;
      if (s !== null && Date.now() >= renewalDue(s.expiresAt, s.serverTime, s.receivedAt)) void this.renew();
      else if (s === null && this.keeper.hasSession()) void this.renew();
    }
  }
  // ---------------------------------------------------------------- helpers
  setAuthInfo(auth) {
    const old = this.authInfo;
    if (old.state === auth.state && old.userId === auth.userId && old.expiresAt === auth.expiresAt) return;
    this.authInfo = Object.freeze({ ...auth });
    for (const listener of [...this.authListeners]) listener(this.authInfo);
  }
  setConnState(state) {
    this.connState = state;
  }
  checkOpen() {
    if (this.closed) throw new TetherError(ClientErrorCode.CLOSED, "the client is closed");
  }
  clearTimer(name) {
    const t = this.timers[name];
    if (t !== null) {
      clearTimeout(t);
      clearInterval(t);
      this.timers[name] = null;
    }
  }
  clearTimers() {
    for (const name of Object.keys(this.timers)) this.clearTimer(name);
  }
};
export {
  AuthErrorCode,
  ClientErrorCode,
  CloseCode,
  ErrorCode,
  PROTOCOL_VERSION,
  TetherClient,
  TetherError
};
