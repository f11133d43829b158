// Reconnect planning and renewal deadlines: pure functions of close codes, time and randomness.
import { test } from "node:test";
import assert from "node:assert/strict";

import { Backoff, Reconnector, renewalDue } from "../src/reconnect.js";
import { closeDecision } from "../src/protocol.js";

test("close codes: 4000-4499 and plain codes back off, 1012 reconnects at once, 4500-4999 stop", () => {
  for (const code of [null, 1000, 1001, 1006, 1009, 1011, 4000, 4008, 4009, 4429, 4499]) {
    assert.equal(closeDecision(code), "reconnect", String(code));
  }
  assert.equal(closeDecision(1012), "reconnect_now");
  for (const code of [4500, 4503, 4999]) assert.equal(closeDecision(code), "stop");
});

test("backoff is full jitter under a doubling ceiling, capped", () => {
  const b = new Backoff(100, 16_000);
  assert.deepEqual([0, 1, 2, 3].map((n) => b.ceiling(n)), [100, 200, 400, 800]);
  assert.equal(b.ceiling(20), 16_000);
  assert.equal(b.ceiling(1000), 16_000);
  assert.equal(b.delay(3, 0.25), 200);
});

test("the reconnector grows its backoff across quick failures and resets after a stable connection", () => {
  const r = new Reconnector(new Backoff(100, 16_000), () => 0.999);
  let now = 0;
  const delays = [];
  for (let i = 0; i < 4; i++) {
    r.connected(now);
    now += 50; // closed at once (a crash loop, a rate limit)
    delays.push(Math.round(r.plan(4429, now).delayMs));
  }
  assert.deepEqual(delays, [100, 200, 400, 799]);
  r.connected(now);
  now += 10_000;
  assert.equal(Math.round(r.plan(1006, now).delayMs), 100); // stable for 10 s: attempt 0 again
  const stop = r.plan(4503, now);
  assert.equal(stop.decision, "stop");
  assert.equal(r.plan(1012, now).delayMs, 0);
});

test("renewal is due min(30 s, a quarter of the lifetime) before exp, on the server's clock", () => {
  // One-hour token, clocks agree: 30 s before exp.
  assert.equal(renewalDue(3_600_000, 0, 0), 3_570_000);
  // Two-second token: half a second before exp.
  assert.equal(renewalDue(2_000, 0, 0), 1_500);
  // The local clock is 5 s ahead of the server's: the deadline moves 5 s later locally.
  assert.equal(renewalDue(3_600_000, 0, 5_000), 3_575_000);
});
