// Unit tests of the sans-I/O protocol core: frames in, frames and events out, a fake clock.
import { test } from "node:test";
import assert from "node:assert/strict";

import { ClientCore, UNBOUND, initialRequestId, tokenSubject, type CoreEvent } from "../src/core.js";
import { Backoff } from "../src/reconnect.js";
import { TetherError } from "../src/errors.js";

type Frame = Record<string, unknown>;

class Harness {
  now = 0;
  readonly core: ClientCore;

  constructor(rand = 0.5) {
    this.core = new ClientCore("client-1", {
      clock: () => this.now,
      rand: () => rand,
      firstRequestId: 100,
      retryBackoff: new Backoff(100, 5000),
    });
  }

  sent(): Frame[] {
    return this.core.dataToSend().map((t) => JSON.parse(t) as Frame);
  }

  recv(frame: Frame): CoreEvent[] {
    const events = this.core.receive(JSON.stringify(frame));
    this.core.flush();
    this.core.validate();
    return events;
  }

  /** Open a connection and answer `connect`. */
  open(): void {
    this.core.connectionOpened();
    this.recv({ type: "connected", connectionId: "c", serverTime: 1, protocol: 1 });
  }

  authOk(version: number, userId: string | null, expiresAt = 10_000, tokens?: Frame): CoreEvent[] {
    return this.recv({
      type: "auth_ok",
      authVersion: version,
      identity: userId === null ? null : { userId, sessionId: `s-${userId}` },
      expiresAt: userId === null ? null : expiresAt,
      serverTime: 0,
      ...(tokens ? { tokens } : {}),
    });
  }
}

function types(frames: Frame[]): unknown[] {
  return frames.map((f) => f["type"]);
}

function jwt(sub: string): string {
  const enc = (o: object) => Buffer.from(JSON.stringify(o)).toString("base64url");
  return `${enc({ alg: "EdDSA" })}.${enc({ sub })}.sig`;
}

test("a new connection pipelines connect, authenticate and subscriptions; mutations wait for auth_ok", () => {
  const h = new Harness();
  const q = h.core.subscribe("counter.get", { name: "a" });
  const rid = h.core.mutate("counter.increment", { name: "a" }, "u1");
  assert.deepEqual(h.sent(), []); // nothing without a connection
  h.core.connectionOpened();
  h.core.authenticate(jwt("u1"), "u1");
  h.core.pipeline();
  const out = h.sent();
  assert.deepEqual(types(out), ["connect", "authenticate", "subscribe"]);
  assert.equal(out[0]!["clientId"], "client-1");
  assert.equal(out[1]!["authVersion"], 1);
  assert.equal(out[2]!["queryId"], q);
  h.core.validate();
  h.recv({ type: "connected", connectionId: "c", serverTime: 1, protocol: 1 });
  assert.deepEqual(h.sent(), []);
  h.authOk(1, "u1");
  const after = h.sent();
  assert.deepEqual(types(after), ["mutate"]);
  assert.equal(after[0]!["requestId"], rid);
});

test("transitions carry versions to the subscription's handle; versions only grow", () => {
  const h = new Harness();
  h.open();
  h.core.pipeline();
  const q = h.core.subscribe("counter.get", { name: "a" });
  h.sent();
  const events = h.recv({ type: "transition", version: 7, updates: [{ queryId: q, value: 3 }] });
  assert.deepEqual(events, [{ type: "query_update", queryId: q, version: 7, value: 3 }]);
  const err = h.recv({
    type: "transition",
    version: 5,
    updates: [{ queryId: q, error: { code: "forbidden", message: "no" } }, { queryId: 999, value: 1 }],
  });
  assert.deepEqual(err, [
    { type: "query_update", queryId: q, version: 5, error: { code: "forbidden", message: "no" } },
  ]);
  assert.equal(h.core.version, 7);
});

test("unsubscribe goes out only for a subscription the server has; later results are dropped", () => {
  const h = new Harness();
  const q = h.core.subscribe("whoami", {});
  h.core.unsubscribe(q); // never sent: nothing to say
  h.open();
  h.core.pipeline();
  assert.deepEqual(types(h.sent()), ["connect"]);
  const q2 = h.core.subscribe("whoami", {});
  h.sent();
  h.core.unsubscribe(q2);
  assert.deepEqual(h.sent(), [{ type: "unsubscribe", queryId: q2 }]);
  assert.deepEqual(h.recv({ type: "transition", version: 1, updates: [{ queryId: q2, value: 1 }] }), []);
});

test("a mutation is re-sent with the same requestId after a reconnect, and answered once", () => {
  const h = new Harness();
  h.open();
  h.core.pipeline();
  h.sent();
  const rid = h.core.mutate("counter.increment", { name: "a" }, null);
  assert.deepEqual(types(h.sent()), ["mutate"]);
  // The socket dies before the answer.
  h.core.connectionLost();
  h.core.validate();
  h.open();
  h.core.pipeline();
  const resent = h.sent().filter((f) => f["type"] === "mutate");
  assert.equal(resent.length, 1);
  assert.equal(resent[0]!["requestId"], rid);
  const done = h.recv({ type: "mutation_result", requestId: rid, value: 1, version: 4 });
  assert.deepEqual(done, [{ type: "mutation_done", requestId: rid, value: 1, version: 4 }]);
  // A duplicate answer (a replay on a third connection) is ignored.
  assert.deepEqual(h.recv({ type: "mutation_result", requestId: rid, value: 1, version: 4 }), []);
  assert.equal(h.core.mutations.size, 0);
});

test("rule 3: unavailable is not an outcome; the same requestId goes out after a jittered backoff", () => {
  const h = new Harness(0.5);
  h.open();
  h.core.pipeline();
  h.sent();
  const rid = h.core.mutate("notes.add", { text: "x" }, null);
  h.sent();
  const ev = h.recv({ type: "mutation_result", requestId: rid, error: { code: "unavailable", message: "" } });
  assert.deepEqual(ev, [{ type: "mutation_deferred", requestId: rid, code: "unavailable", retryInMs: 50 }]);
  assert.deepEqual(h.sent(), []); // not before the backoff
  assert.equal(h.core.nextRetryAt(), 50);
  h.now = 49;
  h.core.flush();
  assert.deepEqual(h.sent(), []);
  h.now = 50;
  h.core.flush();
  const again = h.sent();
  assert.deepEqual(types(again), ["mutate"]);
  assert.equal(again[0]!["requestId"], rid);
  // The second deferral waits longer (attempt 1: up to 200 ms).
  const ev2 = h.recv({ type: "error", code: "rate_limited", message: "", requestId: rid });
  assert.deepEqual(ev2, [{ type: "mutation_deferred", requestId: rid, code: "rate_limited", retryInMs: 100 }]);
  h.now = 150;
  h.core.flush();
  const ev3 = h.recv({ type: "mutation_result", requestId: rid, error: { code: "invalid", message: "bad" } });
  assert.deepEqual(ev3, [{ type: "mutation_done", requestId: rid, error: { code: "invalid", message: "bad" } }]);
});

test("rule 4: a pending mutation of another user is failed with unauthenticated, never sent", () => {
  const h = new Harness();
  h.open();
  h.core.authenticate(jwt("u1"), "u1");
  h.core.pipeline();
  h.authOk(1, "u1");
  h.sent();
  const rid = h.core.mutate("notes.add", { text: "mine" }, "u1");
  assert.deepEqual(types(h.sent()), ["mutate"]);
  h.core.connectionLost();
  h.open();
  h.core.authenticate(jwt("u2"), "u2");
  h.core.pipeline();
  const events = h.authOk(2, "u2");
  assert.ok(h.sent().every((f) => f["type"] !== "mutate"));
  const done = events.find((e) => e.type === "mutation_done");
  assert.ok(done && done.type === "mutation_done" && done.requestId === rid);
  assert.equal(done.error?.code, "unauthenticated");
});

test("rule 2: auth_error unavailable keeps the identity; other codes make the connection anonymous", () => {
  const h = new Harness();
  h.open();
  h.core.authenticate(jwt("u1"), "u1");
  h.core.pipeline();
  h.authOk(1, "u1");
  h.core.authenticate(jwt("u1"), "u1");
  h.recv({ type: "auth_error", authVersion: 2, code: "unavailable", message: "" });
  assert.equal(h.core.identity?.userId, "u1");
  const rid = h.core.mutate("notes.add", { text: "a" }, "u1");
  assert.deepEqual(types(h.sent()).filter((t) => t === "mutate"), ["mutate"]);
  h.core.authenticate("garbage", "u1");
  h.recv({ type: "auth_error", authVersion: 3, code: "invalid_token", message: "" });
  assert.equal(h.core.identity, null);
  assert.ok(h.core.held);
  // Sent under u1 before the failed request: it goes out again once the connection is u1.
  h.sent();
  h.core.authenticate(jwt("u1"), "u1");
  assert.deepEqual(types(h.sent()), ["authenticate"]);
  h.authOk(4, "u1");
  const resent = h.sent();
  assert.deepEqual(types(resent), ["mutate"]);
  assert.equal(resent[0]!["requestId"], rid);
});

test("subscriptions pipelined behind a refused authenticate move to new queryIds", () => {
  const h = new Harness();
  const q = h.core.subscribe("notes.mine", {});
  h.core.connectionOpened();
  h.core.authenticate(jwt("u1"), "u1");
  h.core.pipeline();
  assert.deepEqual(types(h.sent()), ["connect", "authenticate", "subscribe"]);
  h.recv({ type: "connected", connectionId: "c", serverTime: 0, protocol: 1 });
  h.recv({ type: "auth_error", authVersion: 1, code: "token_expired", message: "" });
  // The old queryId is dropped; its anonymous result never reaches the application.
  assert.deepEqual(h.sent(), [{ type: "unsubscribe", queryId: q }]);
  assert.deepEqual(
    h.recv({ type: "transition", version: 2, updates: [{ queryId: q, error: { code: "unauthenticated", message: "" } }] }),
    [],
  );
  // A new token: the subscription goes out again under a new queryId, same handle.
  h.core.authenticate(jwt("u1"), "u1");
  const out = h.sent();
  assert.deepEqual(types(out), ["authenticate", "subscribe"]);
  const wire = out[1]!["queryId"] as number;
  assert.notEqual(wire, q);
  h.authOk(2, "u1");
  const ev = h.recv({ type: "transition", version: 3, updates: [{ queryId: wire, value: [] }] });
  assert.deepEqual(ev, [{ type: "query_update", queryId: q, version: 3, value: [] }]);
});

test("auth_expired and session_revoked lapse the connection: no mutation goes out until an auth answer", () => {
  for (const push of [
    { type: "auth_expired", expiresAt: 10_000, serverTime: 10_001 },
    { type: "session_revoked", reason: "signed_out" },
  ]) {
    const h = new Harness();
    h.open();
    h.core.authenticate(jwt("u1"), "u1");
    h.core.pipeline();
    h.authOk(1, "u1");
    h.sent();
    const events = h.recv(push);
    assert.equal(events[0]!.type, push.type === "auth_expired" ? "auth_expired" : "session_revoked");
    if (events[0]!.type === "session_revoked") assert.equal(events[0]!.sessionId, "s-u1");
    assert.ok(h.core.lapsed);
    h.core.mutate("counter.increment", { name: "a" }, null);
    assert.deepEqual(h.sent(), []);
    h.core.authenticate(null);
    assert.deepEqual(types(h.sent()), ["authenticate"]);
    h.authOk(2, null);
    assert.deepEqual(types(h.sent()), ["mutate"]);
  }
});

test("auth_expiring is reported only for the identity the connection holds", () => {
  const h = new Harness();
  h.open();
  h.core.authenticate(jwt("u1"), "u1");
  h.core.pipeline();
  h.authOk(1, "u1", 10_000);
  assert.deepEqual(h.recv({ type: "auth_expiring", expiresAt: 9_000, serverTime: 1 }), []);
  assert.deepEqual(h.recv({ type: "auth_expiring", expiresAt: 10_000, serverTime: 1 }), [
    { type: "auth_expiring", expiresAt: 10_000, serverTime: 1 },
  ]);
});

test("an in-band refresh keeps the same user: pending mutations are not re-sent", () => {
  const h = new Harness();
  h.open();
  h.core.authenticate(jwt("u1"), "u1");
  h.core.pipeline();
  h.authOk(1, "u1");
  h.sent();
  h.core.mutate("notes.add", { text: "a" }, "u1");
  h.sent();
  h.core.refresh("rt", "k".repeat(32), "u1");
  const out = h.sent();
  assert.deepEqual(out, [{ type: "refresh", refreshToken: "rt", retryKey: "k".repeat(32), authVersion: 2 }]);
  const ev = h.authOk(2, "u1", 20_000, { accessToken: "a", refreshToken: "r2", expiresAt: 20_000 });
  assert.equal(ev[0]!.type, "auth_ok");
  assert.deepEqual(h.sent(), []); // the mutation is still in flight, not sent twice
});

test("abandonUserMutations fails user and unbound mutations, keeps anonymous ones", () => {
  const h = new Harness();
  const a = h.core.mutate("x", {}, "u1");
  const b = h.core.mutate("x", {}, UNBOUND);
  const c = h.core.mutate("x", {}, null);
  const events = h.core.abandonUserMutations();
  assert.deepEqual(
    events.map((e) => (e.type === "mutation_done" ? e.requestId : -1)),
    [a, b],
  );
  assert.deepEqual([...h.core.mutations.keys()], [c]);
});

test("a frame over the message limit fails the call that made it", () => {
  const core = new ClientCore("c", { maxMessageBytes: 100 });
  assert.throws(() => core.subscribe("x", { body: "y".repeat(200) }), (e: unknown) => e instanceof TetherError && e.code === "message_too_large");
  assert.equal(core.subscriptions.size, 0);
});

test("requestIds start at a time-based value so a reloaded page does not reuse them", () => {
  assert.ok(initialRequestId(Date.UTC(2030, 0, 1)) > initialRequestId(Date.UTC(2026, 0, 1)));
  assert.ok(Number.isSafeInteger(initialRequestId(Date.UTC(2200, 0, 1))));
  assert.equal(tokenSubject(jwt("u9")), "u9");
  assert.equal(typeof tokenSubject("not-a-jwt"), "symbol");
});

test("an error naming a subscription rejects it; unknown frames are reported, not thrown", () => {
  const h = new Harness();
  h.open();
  h.core.pipeline();
  const q = h.core.subscribe("nope", {});
  h.sent();
  assert.deepEqual(h.recv({ type: "error", code: "unknown_function", message: "m", queryId: q }), [
    { type: "query_rejected", queryId: q, code: "unknown_function", message: "m" },
  ]);
  assert.equal(h.core.subscriptions.size, 0);
  assert.equal(h.core.receive("not json")[0]!.type, "unrecognized");
  assert.equal(h.core.receive('{"type":"whatever"}')[0]!.type, "unrecognized");
});
