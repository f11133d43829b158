/**
 * When to reconnect, and when to renew a token: pure functions of a close code, the time and a
 * random number, so tests drive them without sleeping.
 */

import { closeDecision, type CloseDecision } from "./protocol.js";

/**
 * Exponential backoff with full jitter: attempt `n` waits a uniformly random time in
 * `[0, min(maximumMs, initialMs * 2**n)]`. Full jitter spreads a crowd of clients that lost the
 * same instance over the whole window, so they do not arrive at the next one together.
 */
export class Backoff {
  constructor(
    readonly initialMs = 100,
    readonly maximumMs = 16_000,
  ) {}

  /** The longest wait of attempt `attempt` (0-based). */
  ceiling(attempt: number): number {
    if (attempt >= 64) return this.maximumMs;
    return Math.min(this.maximumMs, this.initialMs * 2 ** attempt);
  }

  /** The wait of attempt `attempt` for a uniform `rand` in `[0, 1)`. */
  delay(attempt: number, rand: number): number {
    return rand * this.ceiling(attempt);
  }
}

/** Re-sends of a mutation whose outcome is unknown: 100 ms doubling to 5 s, full jitter. */
export const DEFAULT_MUTATION_RETRY_BACKOFF = new Backoff(100, 5_000);

export interface ReconnectPlan {
  readonly decision: CloseDecision;
  /** Milliseconds to wait before the next attempt (0 for `reconnect_now` and `stop`). */
  readonly delayMs: number;
  readonly closeCode: number | null;
}

/**
 * How long to wait before the next connection attempt. The attempt counter goes back to zero
 * once a connection has stayed up `stableAfterMs`, so a server that accepts and then closes at
 * once (a rate limit, a crash loop) still meets a growing backoff.
 */
export class Reconnector {
  attempt = 0;
  private connectedAt: number | null = null;

  constructor(
    readonly backoff: Backoff = new Backoff(),
    private readonly rand: () => number = Math.random,
    readonly stableAfterMs = 10_000,
  ) {}

  /** The server answered `connect` at `now` (ms, any monotonic clock). */
  connected(now: number): void {
    this.connectedAt = now;
  }

  /** The connection closed with `closeCode` (`null`: it never opened) at `now`. */
  plan(closeCode: number | null, now: number): ReconnectPlan {
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
  reset(): void {
    this.attempt = 0;
  }
}

/** Renew an access token this long before its `exp` at the latest, or a quarter of its life. */
export const DEFAULT_RENEWAL_MARGIN_MS = 30_000;

/**
 * When (local wall-clock ms) to renew an access token at the latest. `expiresAt` is its `exp`,
 * `serverTime` the server's clock when it was received at local time `receivedAt`; the deadline
 * moves by the skew between the clocks, because the server's clock ends the identity. The
 * renewal comes `min(margin, lifetime / 4)` before `exp`.
 */
export function renewalDue(
  expiresAt: number,
  serverTime: number,
  receivedAt: number,
  marginMs = DEFAULT_RENEWAL_MARGIN_MS,
): number {
  const lifetime = Math.max(expiresAt - serverTime, 0);
  const skew = serverTime - receivedAt;
  return expiresAt - skew - Math.min(marginMs, lifetime / 4);
}

/** `expiresAt` (server clock) on the local clock. */
export function localExpiry(expiresAt: number, serverTime: number, receivedAt: number): number {
  return expiresAt - (serverTime - receivedAt);
}
