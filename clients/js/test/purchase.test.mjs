// buy(), startTrial() and portal() against a scripted broker (no database): the refusals an app
// handles, the checkout's own expiry, a client without a pinned key. The same calls against a real
// broker and the fake Stripe API: purchase-server.test.mjs.
import assert from "node:assert/strict";
import { mkdtemp } from "node:fs/promises";
import { createServer } from "node:http";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import {
  AlreadyPaidError,
  BrokerError,
  BrokerUnavailableError,
  CheckoutExpiredError,
  EXPIRY_GRACE_MS,
  LicenseClient,
  NoCustomerError,
  NotOfferedError,
  RateLimitedError,
  TrialUsedError,
} from "license-broker-client";

process.removeAllListeners("warning"); // the unverified client's warning is expected here

/** A broker that answers each route as `routes[path]` says: [status, body, headers] or a function of the request body. */
async function scripted(routes) {
  const requests = [];
  const server = createServer(async (request, response) => {
    let text = "";
    for await (const chunk of request) text += chunk;
    const path = new URL(request.url, "http://x").pathname;
    requests.push({ path, method: request.method, body: text ? JSON.parse(text) : null, auth: request.headers.authorization ?? null });
    const route = routes[path];
    if (route === undefined) return response.writeHead(404).end();
    if (route === "stream") {
      response.writeHead(200, { "content-type": "text/event-stream" });
      return routes.onStream(response);
    }
    const [status, body, headers = {}] = typeof route === "function" ? route(text ? JSON.parse(text) : null) : route;
    response.writeHead(status, { "content-type": "application/json", ...headers });
    response.end(JSON.stringify(body));
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  const open = new Set();
  server.on("connection", (socket) => {
    open.add(socket);
    socket.on("close", () => open.delete(socket));
  });
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    requests,
    close: () => {
      for (const socket of open) socket.destroy();
      return new Promise((resolve) => server.close(resolve));
    },
  };
}

const client = async (url, options = {}) =>
  new LicenseClient({ baseUrl: url, appId: "com.example.draw", machineId: "os-id-unit", cache: join(await mkdtemp(join(tmpdir(), "lb-purchase-")), "lease"), minBackoffMs: 20, maxBackoffMs: 100, ...options });

const checkout = (expiresAt) => [201, { license_id: "lic_new", machine_id: "mch_1", token: "a.b.c", checkout_url: "https://checkout.example/pay/cs_1", expires_at: expiresAt }];

test("each refusal of the three routes is its own error, with its code", async () => {
  const broker = await scripted({
    "/api/checkout": [409, { error: "this license is paid for already: manage it with POST /api/portal" }],
    "/api/trials": [404, { error: "trials are off on this server (LICENSE_TRIAL_DAYS is not set)" }],
    "/api/portal": [409, { error: "this license has no Stripe customer yet (nothing bought): nothing to manage" }],
  });
  try {
    const app = await client(broker.url);
    const paid = await app.buy().catch((error) => error);
    assert.ok(paid instanceof AlreadyPaidError && paid.code === "already_paid", String(paid));
    const off = await app.startTrial().catch((error) => error);
    assert.ok(off instanceof NotOfferedError && off.code === "not_offered" && off.status === 404, String(off));
    await assert.rejects(app.portal(), /no machine is activated here/); // nothing sent without a token
    assert.deepEqual(broker.requests.map((r) => r.path), ["/api/checkout", "/api/trials"]);
    // What was sent: the fingerprint and the labels, no token (no license here yet).
    assert.match(broker.requests[0].body.fingerprint, /^[0-9a-f]{64}$/);
    assert.deepEqual([broker.requests[0].body.platform, broker.requests[0].auth], [process.platform, null]);
  } finally {
    await broker.close();
  }
  const used = await scripted({ "/api/trials": [409, { error: "this machine has had its trial" }], "/api/portal": [409, { error: "this license has no Stripe customer yet (nothing bought): nothing to manage" }] });
  try {
    const app = new LicenseClient({ baseUrl: used.url, licenseId: "lic_1", token: "subscriber.token.x" });
    await assert.rejects(app.portal(), NoCustomerError); // a subscriber token opens the portal too
    assert.equal(used.requests[0].auth, "Bearer subscriber.token.x");
    await assert.rejects((await client(used.url)).startTrial(), TrialUsedError);
  } finally {
    await used.close();
  }
});

test("a 429 is RateLimitedError with its Retry-After, and the route is not asked again before it", async () => {
  const broker = await scripted({
    "/api/checkout": [429, { error: "too many checkouts from your network, try again later" }, { "retry-after": "30" }],
    "/api/trials": [503, { error: "database unavailable" }, { "retry-after": "2" }],
  });
  try {
    const app = await client(broker.url);
    const limited = await app.buy().catch((error) => error);
    assert.ok(limited instanceof RateLimitedError, String(limited));
    assert.deepEqual([limited.code, limited.retryAfter, limited.status], ["rate_limited", 30, 429]);
    const again = await app.buy().catch((error) => error);
    assert.ok(again instanceof RateLimitedError && again.retryAfter > 28 && again.retryAfter <= 30, String(again.retryAfter));
    // Another route is its own: asked, and a 503 is BrokerUnavailableError with its Retry-After.
    const busy = await app.startTrial().catch((error) => error);
    assert.ok(busy instanceof BrokerUnavailableError && busy.retryAfter === 2, String(busy));
    assert.deepEqual(broker.requests.map((r) => r.path), ["/api/checkout", "/api/trials"]);
  } finally {
    await broker.close();
  }
});

test("an answer that is not the protocol's keeps nothing", async () => {
  const broker = await scripted({ "/api/checkout": [201, { license_id: "lic_x", checkout_url: 7 }] });
  try {
    const app = await client(broker.url);
    await assert.rejects(app.buy(), (error) => error instanceof BrokerError && /not what docs\/protocol\.md says/.test(error.message));
    assert.equal(app.activated, false);
  } finally {
    await broker.close();
  }
});

test("a checkout past its expires_at (and the grace) rejects completed with CheckoutExpiredError", async () => {
  const expiresAt = Math.floor((Date.now() - EXPIRY_GRACE_MS) / 1000) - 1;
  const broker = await scripted({
    "/api/checkout": checkout(expiresAt),
    "/api/licenses/lic_new/events": "stream",
    onStream: (response) => response.write(`retry: 50\nid: 1\ndata: ${JSON.stringify({ license_id: "lic_new", seq: 1, status: "none", entitled: false })}\n\n`),
  });
  const app = await client(broker.url);
  try {
    const purchase = await app.buy("price_1");
    assert.deepEqual([purchase.checkoutUrl, purchase.licenseId, purchase.machineId, purchase.expiresAt], ["https://checkout.example/pay/cs_1", "lic_new", "mch_1", expiresAt]);
    assert.equal(broker.requests[0].body.price, "price_1");
    const expired = await purchase.completed.catch((error) => error);
    assert.ok(expired instanceof CheckoutExpiredError && expired.expiresAt === expiresAt, String(expired));
  } finally {
    app.stop();
    await broker.close();
  }
});

test("without a pinned key, completed follows the live state: the first entitled one after the checkout, not a trial's", async () => {
  let send;
  const broker = await scripted({
    "/api/checkout": checkout(Math.floor(Date.now() / 1000) + 3600),
    "/api/licenses/lic_new/events": "stream",
    onStream: (response) => {
      send = (seq, fields) => response.write(`id: ${seq}\ndata: ${JSON.stringify({ license_id: "lic_new", seq, ...fields })}\n\n`);
      send(1, { status: "none", entitled: false });
    },
  });
  const app = await client(broker.url);
  try {
    const purchase = await app.buy();
    const deadline = Date.now() + 5_000;
    while (send === undefined || app.state?.seq !== 1) {
      assert.ok(Date.now() < deadline, "the stream's first state (buy() started the client)");
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
    send(2, { status: "trialing", entitled: true, state: { kind: "trial" } });
    send(3, { status: "active", entitled: true, state: { kind: "subscription" } });
    assert.equal(await purchase.completed, null);
    assert.equal(app.state.seq, 3);
  } finally {
    app.stop();
    await broker.close();
  }
});
