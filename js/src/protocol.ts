/**
 * The wire vocabulary of `/sync` and the HTTP auth API (contract §2, §3), defined once for the
 * browser client: message types, codes, close codes and what each close code asks of a client.
 * Mirrors `server/tether/protocol.py`; where they differ, the contract decides.
 */

/** `protocol` of `connect` and `connected`. */
export const PROTOCOL_VERSION = 1;
/** Integers on the wire (`queryId`, `requestId`, `authVersion`) stay below this. */
export const MAX_SAFE_INT = Number.MAX_SAFE_INTEGER;
/** The server's default `TETHER_MAX_MESSAGE_BYTES`. */
export const DEFAULT_MAX_MESSAGE_BYTES = 65536;

export const ClientMessageType = {
  CONNECT: "connect",
  AUTHENTICATE: "authenticate",
  REFRESH: "refresh",
  SUBSCRIBE: "subscribe",
  UNSUBSCRIBE: "unsubscribe",
  MUTATE: "mutate",
  PING: "ping",
} as const;

export const ServerMessageType = {
  CONNECTED: "connected",
  AUTH_OK: "auth_ok",
  AUTH_ERROR: "auth_error",
  AUTH_EXPIRING: "auth_expiring",
  AUTH_EXPIRED: "auth_expired",
  SESSION_REVOKED: "session_revoked",
  TRANSITION: "transition",
  MUTATION_RESULT: "mutation_result",
  ERROR: "error",
  PONG: "pong",
} as const;

/** `auth_error` codes, and the HTTP auth API's error codes (§2, §3). */
export const AuthErrorCode = {
  INVALID_TOKEN: "invalid_token",
  TOKEN_EXPIRED: "token_expired",
  SESSION_REVOKED: "session_revoked",
  REFRESH_INVALID: "refresh_invalid",
  REFRESH_REUSED: "refresh_reused",
  RATE_LIMITED: "rate_limited",
  UNAVAILABLE: "unavailable",
  INVALID_CREDENTIALS: "invalid_credentials",
  INVALID_REQUEST: "invalid_request",
  EMAIL_TAKEN: "email_taken",
} as const;

/** `error` frame codes and the application-function codes the client itself relies on. */
export const ErrorCode = {
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
  UNAVAILABLE: "unavailable",
} as const;

/**
 * Codes the client library itself reports (never sent by the server):
 * `network` (the server could not be reached), `outcome_unknown` (a mutation given up on before a
 * definite answer, §5 rule 3), `closed` (the client was closed), `message_too_large`.
 */
export const ClientErrorCode = {
  NETWORK: "network",
  OUTCOME_UNKNOWN: "outcome_unknown",
  CLOSED: "closed",
  MESSAGE_TOO_LARGE: "message_too_large",
} as const;

/** `session_revoked` reasons. */
export type SessionEndReason =
  | "signed_out"
  | "signed_out_everywhere"
  | "refresh_reused"
  | "session_expired"
  | "revoked";

/** Named close codes (§3, "Close codes"). */
export const CloseCode = {
  NORMAL: 1000,
  GOING_AWAY: 1001,
  ABNORMAL: 1006,
  MESSAGE_TOO_BIG: 1009,
  INTERNAL_ERROR: 1011,
  SERVICE_RESTART: 1012,
  SLOW_CONSUMER: 4008,
  HEARTBEAT_TIMEOUT: 4009,
  RATE_LIMITED: 4429,
  PROTOCOL_VIOLATION: 4500,
  UNSUPPORTED_PROTOCOL: 4503,
} as const;

/**
 * What a close asks of a client: `reconnect` after a backoff (4000–4499 and every code that
 * says nothing more), `reconnect_now` (1012: the instance drains), `stop` (4500–4999: do not
 * reconnect until something changes).
 */
export type CloseDecision = "reconnect" | "reconnect_now" | "stop";

/** The decision for a close with `code` (`null`: no close frame, or the socket never opened). */
export function closeDecision(code: number | null): CloseDecision {
  if (code === CloseCode.SERVICE_RESTART) return "reconnect_now";
  if (code !== null && code >= 4500 && code <= 4999) return "stop";
  return "reconnect";
}

/**
 * How the client takes an `auth_error` (or an HTTP auth error) code:
 * `passing` — try again later, never a sign-out (`unavailable`, `rate_limited`, `network`, and
 * codes this client does not know); `new_token` — the token presented is refused, get another
 * (`token_expired`, `invalid_token`); `session_ended` — the session is over (`refresh_invalid`,
 * `refresh_reused`, `session_revoked`).
 */
export type AuthCodeKind = "passing" | "new_token" | "session_ended";

export function classifyAuthCode(code: string): AuthCodeKind {
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

/** `auth_error` codes after which the server keeps the connection's identity (§5 rule 2). */
export const IDENTITY_KEEPING_AUTH_CODES: ReadonlySet<string> = new Set([
  AuthErrorCode.UNAVAILABLE,
  AuthErrorCode.RATE_LIMITED,
]);

/**
 * Answers to a `mutate` that are not an outcome: the same `requestId` goes out again later.
 * `unavailable` (a `mutation_result`, §5 rule 3): the server could not learn whether it
 * committed; `rate_limited` (an `error` naming the `requestId`): the frame was dropped unread.
 */
export const RETRY_MUTATION_CODES: ReadonlySet<string> = new Set([
  ErrorCode.UNAVAILABLE,
  ErrorCode.RATE_LIMITED,
]);
