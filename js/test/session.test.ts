// The multi-tab session policy (SessionKeeper) with several "tabs" in one process: a shared store
// (localStorage), a shared channel (BroadcastChannel), a shared lock (Web Locks) and a fake clock.
// The refresh endpoint is a small model of contract §2's rotation rules (rules 1-3), so a tab
// that presents a token another tab rotated past the window is caught as `refresh_reused`.
import { test } from "node:test";
import assert from "node:assert/strict";

import { promiseMutex } from "../src/browser.js";
import { TetherError } from "../src/errors.js";
import {
  SessionKeeper,
  type AuthHttp,
  type LockRunner,
  type RefreshMode,
  type SharedStore,
  type StoredState,
  type TabChannel,
  type TabMessage,
  type TokenResponse,
} from "../src/session.js";

const LIFETIME = 2_000; // 2-second access tokens, as the browser tests use
const REUSE_WINDOW = 10_000;

/** Contract §2 rotation for one session, and a count of what happened. */
class RotationModel implements AuthHttp {
  current = "r0";
  previous: string | null = null;
  previousRetryKey: string | null = null;
  rotatedAt = 0;
  currentUsed = false;
  revoked = false;
  refreshes = 0;
  reused = 0;
  n = 0;
  /** Set: the next refresh rotates on the server but its response is lost. */
  loseNextResponse = false;
  /** Set: the next refresh fails as unavailable without touching anything. */
  failNextUnavailable = false;

  constructor(
    readonly clock: { now: number },
    readonly cookieMode: boolean,
  ) {}

  private pair(): TokenResponse {
    this.accessExpiry.set(`a${this.n}`, this.clock.now + LIFETIME);
    return {
      userId: "u1",
      sessionId: "s1",
      accessToken: `a${this.n}`,
      refreshToken: this.cookieMode ? null : this.current,
      expiresAt: this.clock.now + LIFETIME,
      serverTime: this.clock.now,
    };
  }

  /** The cookie the browser holds in cookie mode: whatever the last delivered response set. */
  cookie = "r0";

  async signIn(): Promise<TokenResponse> {
    return this.pair();
  }

  async signUp(): Promise<TokenResponse> {
    return this.pair();
  }

  async refresh(refreshToken: string | null, retryKey: string | null): Promise<TokenResponse> {
    await Promise.resolve();
    if (this.failNextUnavailable) {
      this.failNextUnavailable = false;
      throw new TetherError("unavailable", "redis down");
    }
    const presented = refreshToken ?? this.cookie;
    if (this.revoked) throw new TetherError("refresh_invalid", "revoked");
    let response: TokenResponse;
    if (presented === this.current) {
      this.previous = this.current;
      this.previousRetryKey = retryKey;
      this.n += 1;
      this.current = `r${this.n}`;
      this.rotatedAt = this.clock.now;
      this.currentUsed = false;
      this.refreshes += 1;
      response = this.pair();
    } else if (
      presented === this.previous &&
      (this.clock.now - this.rotatedAt <= REUSE_WINDOW ||
        (retryKey !== null && retryKey === this.previousRetryKey && !this.currentUsed))
    ) {
      response = this.pair(); // rule 2: the same current pair again
    } else {
      this.reused += 1;
      this.revoked = true;
      throw new TetherError("refresh_reused", "reuse");
    }
    if (this.loseNextResponse) {
      this.loseNextResponse = false;
      throw new TetherError("network", "response lost");
    }
    this.cookie = this.current;
    return response;
  }

  /** The previous token was the one presented: mark the current one used (rule 2's limit). */
  noteUsed(token: string): void {
    if (token === this.current) this.currentUsed = true;
  }

  /** When each access token handed out expires (the server refuses it after that). */
  readonly accessExpiry = new Map<string, number>();
  signOuts = 0;

  async signOut(accessToken: string): Promise<void> {
    await Promise.resolve();
    const expiry = this.accessExpiry.get(accessToken);
    if (this.revoked || expiry === undefined || this.clock.now >= expiry) {
      throw new TetherError("invalid_token", "expired or unknown access token");
    }
    this.signOuts += 1;
    this.revoked = true;
  }
}

class Store implements SharedStore {
  state: StoredState | null = null;
  load(): StoredState | null {
    return this.state === null ? null : { ...this.state };
  }
  save(state: StoredState | null): void {
    this.state = state === null ? null : { ...state };
  }
}

class Hub {
  readonly members = new Set<Channel>();
  /** Messages are delivered asynchronously, as BroadcastChannel does. */
  async settle(): Promise<void> {
    for (let i = 0; i < 5; i++) await new Promise((r) => setImmediate(r));
  }
}

class Channel implements TabChannel {
  private listener: ((m: TabMessage) => void) | null = null;
  constructor(private readonly hub: Hub) {
    hub.members.add(this);
  }
  post(message: TabMessage): void {
    const copy = structuredClone(message);
    for (const other of this.hub.members) {
      if (other !== this) setImmediate(() => other.listener?.(copy));
    }
  }
  onMessage(listener: (m: TabMessage) => void): void {
    this.listener = listener;
  }
  close(): void {
    this.hub.members.delete(this);
  }
}

function origin(mode: RefreshMode) {
  const clock = { now: 1_000_000 };
  const server = new RotationModel(clock, mode === "cookie");
  const store = new Store();
  const hub = new Hub();
  const lock: LockRunner = promiseMutex(); // one lock for all tabs, as Web Locks is per origin
  let keys = 0;
  const tab = () =>
    new SessionKeeper(
      mode,
      {
        http: server,
        store,
        channel: new Channel(hub),
        lock,
        now: () => clock.now,
        newRetryKey: () => `retry-key-${++keys}`.padEnd(20, "x"),
      },
      "test",
    );
  return { clock, server, store, hub, tab };
}

for (const mode of ["storage", "cookie"] as const) {
  test(`${mode}: three tabs over 100 token lifetimes: one refresh per lifetime, never reuse`, async () => {
    const { clock, server, hub, tab } = origin(mode);
    const tabs = [tab(), tab(), tab()];
    await tabs[0]!.signIn("signIn", "a@b.c", "password");
    await hub.settle();
    for (const t of tabs) assert.equal(t.current?.accessToken, "a0");
    for (let lifetime = 0; lifetime < 100; lifetime++) {
      // auth_expiring reaches every tab's connection at about the same time.
      clock.now += LIFETIME / 2;
      const results = await Promise.all(tabs.map((t) => t.renew(t.current!.accessToken)));
      await hub.settle();
      const tokens = new Set(results.map((s) => s?.accessToken));
      assert.equal(tokens.size, 1, "every tab presents the same new token");
      for (const t of tabs) assert.equal(t.current?.accessToken, results[0]?.accessToken);
      clock.now += LIFETIME / 2 - 100;
    }
    assert.equal(server.reused, 0);
    assert.equal(server.refreshes, 100);
    assert.equal(tabs.reduce((n, t) => n + t.refreshCount, 0), 100);
  });

  test(`${mode}: a refresh whose response is lost is recovered with its retryKey after the window`, async () => {
    const { clock, server, store, tab } = origin(mode);
    const [a, b] = [tab(), tab()];
    await a.signIn("signIn", "a@b.c", "password");
    server.loseNextResponse = true;
    clock.now += LIFETIME;
    await assert.rejects(a.renew("a0"), (e: unknown) => e instanceof TetherError && e.code === "network");
    assert.equal(a.current?.accessToken, "a0", "a passing failure changes nothing");
    assert.ok(store.state?.retryKey, "the retryKey stays with the token it was given to");
    // The tab goes away (reload); another holds the lock long after the reuse window.
    a.close();
    clock.now += REUSE_WINDOW * 3;
    const s = await b.renew(null);
    assert.equal(s?.accessToken, "a1", "the same new pair, not refresh_reused");
    assert.equal(server.reused, 0);
    assert.equal(store.state?.retryKey, undefined, "the new token has no retryKey yet");
    if (mode === "storage") assert.equal(store.state?.refreshToken, "r1");
  });

  test(`${mode}: sign-out in one tab signs out every tab`, async () => {
    const { hub, store, tab } = origin(mode);
    const tabs = [tab(), tab(), tab()];
    const seen: Array<string | null> = [];
    for (const t of tabs.slice(1)) t.onChange((s, reason) => s === null && seen.push(reason));
    await tabs[0]!.signIn("signIn", "a@b.c", "password");
    await hub.settle();
    await tabs[0]!.signOut(false);
    await hub.settle();
    assert.deepEqual(seen, ["signed_out", "signed_out"]);
    for (const t of tabs) assert.equal(t.current, null);
    assert.equal(store.state, null);
    assert.equal(await tabs[1]!.freshToken(), null);
  });

  test(`${mode}: sign-out after the access token expired renews first and ends the session on the server`, async () => {
    const { clock, server, hub, store, tab } = origin(mode);
    const [a, b] = [tab(), tab()];
    await a.signIn("signIn", "a@b.c", "password");
    await hub.settle();
    clock.now += LIFETIME * 5; // the tab slept: its access token is long expired
    await a.signOut(false);
    assert.equal(server.signOuts, 1, "the server ended the session");
    assert.equal(server.revoked, true);
    assert.equal(server.reused, 0);
    await hub.settle();
    assert.equal(store.state, null);
    assert.equal(b.current, null);
    // A session that had ended meanwhile: nothing to end, every tab still signs out locally.
    const c = tab();
    await c.signIn("signIn", "a@b.c", "password");
    server.revoked = true; // ended by another device's sign-out-everywhere
    clock.now += LIFETIME * 5;
    await c.signOut(false);
    assert.equal(server.signOuts, 1);
    assert.equal(c.current, null);
    assert.equal(store.state, null);
  });

  test(`${mode}: a session the server ended (refresh_reused) signs out every tab; unavailable does not`, async () => {
    const { clock, server, hub, tab } = origin(mode);
    const [a, b] = [tab(), tab()];
    await a.signIn("signIn", "a@b.c", "password");
    await hub.settle();
    clock.now += LIFETIME;
    server.failNextUnavailable = true;
    await assert.rejects(a.renew("a0"), (e: unknown) => e instanceof TetherError && e.code === "unavailable");
    assert.equal(a.current?.userId, "u1");
    assert.equal(b.current?.userId, "u1");
    server.revoked = true;
    assert.equal(await a.renew("a0"), null);
    await hub.settle();
    assert.equal(a.current, null);
    assert.equal(b.current, null);
  });
}

test("storage: a new tab adopts the stored access token without refreshing", async () => {
  const { server, tab } = origin("storage");
  const a = tab();
  await a.signIn("signIn", "a@b.c", "password");
  const b = tab();
  assert.deepEqual(b.restore(), { userId: "u1", sessionId: "s1" });
  assert.equal(await b.freshToken(), "a0");
  assert.equal(server.refreshes, 0);
});

test("storage: a tab never presents the refresh token it last saw once another tab rotated", async () => {
  const { clock, server, store, tab } = origin("storage");
  const [a, b] = [tab(), tab()];
  await a.signIn("signIn", "a@b.c", "password");
  b.restore();
  clock.now += LIFETIME;
  await a.renew("a0"); // r0 → r1
  server.noteUsed("r1");
  clock.now += LIFETIME;
  await a.renew("a1"); // r1 → r2
  clock.now += REUSE_WINDOW * 2; // far past the window for r1 and r0
  // b missed every message (its channel was down): it still reads the store under the lock.
  const s = await b.renew("a0");
  assert.equal(server.reused, 0);
  assert.equal(s?.accessToken, "a3");
  assert.equal(store.state?.refreshToken, "r3");
});
