// TetherClient against a real `tether serve` (with its embedded redis-server) over a real
// WebSocket (Node's built-in one: `node --experimental-websocket`) and real HTTP. Short tokens
// (4 s) make the session keeping visible within seconds. Skipped when the Python server is not
// installed (`make install` at the repository root, or TETHER_BIN=/path/to/tether).
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import { existsSync, mkdtempSync, openSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";

import { TetherClient, TetherError, type AuthInfo } from "../src/index.js";
import { BroadcastTabChannel, promiseMutex } from "../src/browser.js";
import type { SharedStore, StoredState } from "../src/session.js";

// Compiled to js/.test-build/test/: the repository root is three levels up.
const REPO = resolve(import.meta.dirname, "..", "..", "..");
const TETHER_BIN = process.env["TETHER_BIN"] ?? join(REPO, ".venv", "bin", "tether");
const HAVE_SERVER = existsSync(TETHER_BIN) && typeof WebSocket === "function";
const ACCESS_TTL_S = 4;

let server: ChildProcess | null = null;
let dataDir = "";
let port = 0;

function freePort(): Promise<number> {
  return new Promise((ok, fail) => {
    const s = createServer();
    s.listen(0, "127.0.0.1", () => {
      const address = s.address();
      s.close(() => (typeof address === "object" && address !== null ? ok(address.port) : fail(new Error("no port"))));
    });
  });
}

async function waitFor<T>(what: string, probe: () => T | undefined | null | false, timeoutMs = 30_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = probe();
    if (value !== undefined && value !== null && value !== false) return value as T;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

async function startServer(): Promise<void> {
  server = spawn(TETHER_BIN, ["serve", "--port", String(port)], {
    env: {
      ...process.env,
      TETHER_ACCESS_TTL: String(ACCESS_TTL_S),
      TETHER_CLOCK_LEEWAY: "1",
      TETHER_DATA_DIR: dataDir,
      TETHER_ARGON2_TIME_COST: "2",
      TETHER_ARGON2_MEMORY_KIB: "19456",
      TETHER_ARGON2_PARALLELISM: "1",
    },
    // Logs go to a file: a pipe nobody reads would fill and block the server.
    stdio: ["ignore", "ignore", openSync(join(dataDir, "server.log"), "a")],
  });
  let ready = false;
  const deadline = Date.now() + 30_000;
  while (!ready) {
    if (Date.now() > deadline) throw new Error("tether serve did not become ready");
    try {
      ready = (await fetch(`http://127.0.0.1:${port}/readyz`)).status === 200;
    } catch {
      await new Promise((r) => setTimeout(r, 100));
    }
  }
}

async function stopServer(): Promise<void> {
  const proc = server;
  server = null;
  if (proc === null || proc.exitCode !== null) return;
  const exited = new Promise((r) => proc.once("exit", r));
  proc.kill("SIGTERM");
  await exited;
}

class SharedMemoryStore implements SharedStore {
  state: StoredState | null = null;
  load(): StoredState | null {
    return this.state === null ? null : { ...this.state };
  }
  save(state: StoredState | null): void {
    this.state = state === null ? null : { ...state };
  }
}

/** Tabs of one origin: one store (localStorage), one lock (Web Locks); BroadcastChannel is Node's. */
function origin(name: string) {
  const store = new SharedMemoryStore();
  const lock = promiseMutex();
  const clients: TetherClient[] = [];
  const tab = () => {
    const c = new TetherClient({
      url: `ws://127.0.0.1:${port}/sync`,
      refresh: "storage",
      sessionEnv: { store, lock, channel: new BroadcastTabChannel(`test-origin-${name}`) },
    });
    clients.push(c);
    return c;
  };
  return { store, tab, clients, closeAll: () => clients.forEach((c) => c.close()) };
}

// A test runner killed mid-run must not leave the server (and its redis-server) behind.
process.on("exit", () => server?.kill("SIGKILL"));

before(async () => {
  if (!HAVE_SERVER) return;
  dataDir = mkdtempSync(join(tmpdir(), "tether-js-"));
  port = await freePort();
  await startServer();
});

after(async () => {
  await stopServer();
  if (dataDir) rmSync(dataDir, { recursive: true, force: true });
});

const email = () => `js-${Date.now()}-${Math.random().toString(36).slice(2)}@example.com`;

test("sign up, a live query, and a mutation applied once", { skip: !HAVE_SERVER && "no tether server", timeout: 90_000 }, async () => {
  const { tab, closeAll } = origin("a");
  const client = tab();
  try {
    const auth = await client.signUp({ email: email(), password: "password123" });
    assert.equal(auth.state, "signedIn");
    const counter = `c-${Math.random()}`;
    const values: unknown[] = [];
    const who: unknown[] = [];
    client.subscribe("counter.get", { name: counter }, (v) => values.push(v));
    client.subscribe("whoami", {}, (v) => who.push(v));
    assert.equal(await client.mutate("counter.increment", { name: counter }), 1);
    await waitFor("the transition with 1", () => values.includes(1));
    await waitFor("whoami", () => who.some((w) => (w as { userId?: string } | null)?.userId === auth.userId));
    await assert.rejects(
      client.mutate("messages.send", { channel: "x", body: "" }),
      (e: unknown) => e instanceof TetherError && e.code === "invalid",
    );
  } finally {
    closeAll();
  }
});

test(
  "two tabs stay signed in over several token lifetimes, about one refresh per lifetime for both",
  { skip: !HAVE_SERVER && "no tether server", timeout: 90_000 },
  async () => {
    const { tab, closeAll } = origin("b");
    const a = tab();
    const b = tab();
    const states: AuthInfo["state"][] = [];
    try {
      await a.signUp({ email: email(), password: "password123" });
      await waitFor("tab b adopts the session", () => b.auth.state === "signedIn");
      for (const c of [a, b]) c.onAuthChange((auth) => states.push(auth.state));
      const who: Array<Array<unknown>> = [[], []];
      a.subscribe("whoami", {}, (v) => who[0]!.push(v));
      b.subscribe("whoami", {}, (v) => who[1]!.push(v));
      const lifetimes = 4;
      await new Promise((r) => setTimeout(r, lifetimes * ACCESS_TTL_S * 1000));
      const refreshes = a.refreshCount + b.refreshCount;
      assert.ok(!states.includes("signedOut"), `no sign-out: ${states.join(",")}`);
      // The server pushes auth_expiring at half the lifetime of such short tokens
      // (TETHER_EXPIRY_NOTICE is capped at half), and the client renews on that push: up to
      // two renewals per lifetime for the whole origin — not two per tab.
      assert.ok(refreshes >= lifetimes - 1 && refreshes <= 2 * lifetimes + 1, `refreshes for the origin: ${refreshes}`);
      // Each tab's whoami never went anonymous (a refresh keeps user and session: no re-run).
      for (const values of who) assert.ok(values.length > 0 && values.every((v) => v !== null), JSON.stringify(values));
      assert.equal(await b.mutate("counter.increment", { name: `ok-${Math.random()}` }), 1);
    } finally {
      closeAll();
    }
  },
);

test("sign-out in one tab signs out the other", { skip: !HAVE_SERVER && "no tether server", timeout: 90_000 }, async () => {
  const { tab, closeAll } = origin("c");
  const a = tab();
  const b = tab();
  try {
    await a.signUp({ email: email(), password: "password123" });
    await waitFor("tab b adopts the session", () => b.auth.state === "signedIn");
    const who: unknown[] = [];
    b.subscribe("whoami", {}, (v) => who.push(v));
    await waitFor("b runs as the user", () => who.length > 0 && who.at(-1) !== null);
    await a.signOut();
    await waitFor("b signed out", () => b.auth.state === "signedOut", 5_000);
    await waitFor("b's whoami is anonymous", () => who.at(-1) === null, 5_000);
  } finally {
    closeAll();
  }
});

test(
  "the server restarts: the client reconnects, resubscribes, and a mutation made meanwhile is applied once",
  { skip: !HAVE_SERVER && "no tether server", timeout: 90_000 },
  async () => {
    const { tab, closeAll } = origin("d");
    const client = tab();
    try {
      await client.signUp({ email: email(), password: "password123" });
      const counter = `r-${Math.random()}`;
      const values: unknown[] = [];
      client.subscribe("counter.get", { name: counter }, (v) => values.push(v));
      await waitFor("the first result", () => values.includes(0));
      await stopServer();
      await waitFor("the client notices", () => client.connectionState !== "connected");
      const pending = client.mutate("counter.increment", { name: counter });
      await startServer();
      assert.equal(await pending, 1);
      await waitFor("the view catches up", () => values.at(-1) === 1);
      // Once: a second increment gives 2, not 3.
      assert.equal(await client.mutate("counter.increment", { name: counter }), 2);
      assert.equal(client.auth.state, "signedIn");
    } finally {
      closeAll();
    }
  },
);

test(
  "setAuth: an identity from fetchToken stays signed in across token lifetimes",
  { skip: !HAVE_SERVER && "no tether server", timeout: 90_000 },
  async () => {
    // An identity provider of the application's own: here the HTTP auth API, used directly.
    const base = `http://127.0.0.1:${port}`;
    const post = async (path: string, body: unknown) =>
      (await (
        await fetch(base + path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) })
      ).json()) as { accessToken: string; refreshToken: string; userId: string };
    let tokens = await post("/auth/signup", { email: email(), password: "password123" });
    let forced = 0;
    const client = new TetherClient({
      url: `ws://127.0.0.1:${port}/sync`,
      sessionEnv: { store: new SharedMemoryStore(), channel: new BroadcastTabChannel("test-origin-external") },
    });
    try {
      client.setAuth(async ({ forceRefreshToken }) => {
        if (forceRefreshToken) {
          forced += 1;
          tokens = await post("/auth/refresh", { refreshToken: tokens.refreshToken });
        }
        return tokens.accessToken;
      });
      const who: unknown[] = [];
      client.subscribe("whoami", {}, (v) => who.push(v));
      await waitFor("signed in", () => client.auth.state === "signedIn" && client.auth.userId === tokens.userId);
      await new Promise((r) => setTimeout(r, 3 * ACCESS_TTL_S * 1000));
      assert.ok(forced >= 2, `fetchToken forced ${forced} times`);
      assert.equal(client.auth.state, "signedIn");
      assert.ok(who.length > 0 && who.every((v) => v !== null), JSON.stringify(who));
      assert.equal(await client.mutate("notes.add", { text: "from setAuth" }).then((id) => typeof id), "string");
    } finally {
      client.close();
    }
  },
);

test(
  "sign-out everywhere on one device signs out another device's client (session_revoked)",
  { skip: !HAVE_SERVER && "no tether server", timeout: 90_000 },
  async () => {
    const laptop = origin("e1");
    const phone = origin("e2"); // another browser: its own store, lock and channel
    const a = laptop.tab();
    const b = phone.tab();
    try {
      const address = email();
      await a.signUp({ email: address, password: "password123" });
      await b.signIn({ email: address, password: "password123" });
      const who: unknown[] = [];
      b.subscribe("whoami", {}, (v) => who.push(v));
      await waitFor("the phone runs as the user", () => who.length > 0 && who.at(-1) !== null);
      await a.signOutEverywhere();
      await waitFor("the phone signed out", () => b.auth.state === "signedOut", 10_000);
      await waitFor("the phone's whoami is anonymous", () => who.at(-1) === null, 10_000);
      await assert.rejects(
        b.mutate("notes.add", { text: "after sign-out" }),
        (e: unknown) => e instanceof TetherError && e.code === "unauthenticated",
      );
    } finally {
      laptop.closeAll();
      phone.closeAll();
    }
  },
);
