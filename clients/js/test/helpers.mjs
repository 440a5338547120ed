// Shared by the tests: leases signed the way the broker signs them, and a fake broker.
import { createServer } from "node:http";
import { calculateJwkThumbprint, exportJWK, exportSPKI, generateKeyPair, SignJWT } from "jose";

export const LICENSE = "lic_js_test";
export const NOW = 1_900_000_000_000; // ms: a fixed clock, far from the real one

export async function newKey() {
  const { privateKey, publicKey } = await generateKeyPair("EdDSA", { crv: "Ed25519", extractable: true });
  const jwk = await exportJWK(publicKey);
  const kid = await calculateJwkThumbprint(jwk);
  return { privateKey, publicKey, kid, jwk: { ...jwk, kid, alg: "EdDSA", use: "sig" }, pem: await exportSPKI(publicKey) };
}

export async function signLease(key, { sub = LICENSE, seq = 3, entitled = true, ttl = 600, iat = NOW / 1000 } = {}) {
  const claims = { sub, seq, status: entitled ? "active" : "canceled", entitled, features: ["pro"],
    current_period_end: "2030-01-01T00:00:00+00:00" };
  return new SignJWT(claims).setProtectedHeader({ alg: "EdDSA", kid: key.kid, typ: "JWT" })
    .setIssuedAt(Math.floor(iat)).setExpirationTime(Math.floor(iat) + ttl).sign(key.privateKey);
}

/** What `license-broker keys public` prints: a comment line before each PEM block. */
export function keysPublicOutput(...keys) {
  return keys.map((key, i) => `# kid ${key.kid}${i === 0 ? " (signs)" : " (published only)"}\n${key.pem}`).join("");
}

/** Replaces one claim of a signed lease, keeping its signature (what a user editing it would do). */
export function tamper(token, changes) {
  const [header, payload, signature] = token.split(".");
  const claims = { ...JSON.parse(Buffer.from(payload, "base64url").toString()), ...changes };
  return `${header}.${Buffer.from(JSON.stringify(claims)).toString("base64url")}.${signature}`;
}

/**
 * What an attacker serves at the broker's address (a hostile BROKER_URL, a DNS or network
 * attacker): its own key in the JWKS, an entitled state, and a ten-year lease it signed. Records
 * the paths asked for.
 */
export async function fakeBroker(licenseId) {
  const key = await newKey();
  const now = Math.floor(Date.now() / 1000);
  const state = { license_id: licenseId, seq: 99, status: "active", entitled: true, stripe_event_id: "evt_fake",
    stripe_event_type: "invoice.paid", occurred_at: "2030-01-01T00:00:00Z", state: { features: ["pro"] } };
  const lease = await signLease(key, { sub: licenseId, seq: 99, iat: now, ttl: 10 * 365 * 86400 });
  const requests = [];
  const open = new Set();
  const server = createServer((request, response) => {
    const path = new URL(request.url, "http://x").pathname;
    requests.push(path);
    if (path === "/.well-known/jwks.json") {
      response.writeHead(200, { "content-type": "application/json" });
      response.end(JSON.stringify({ keys: [key.jwk] }));
    } else if (path === `/api/licenses/${licenseId}`) {
      response.writeHead(200, { "content-type": "application/json" });
      response.end(JSON.stringify({ ...state, lease }));
    } else if (path === `/api/licenses/${licenseId}/events`) {
      response.writeHead(200, { "content-type": "text/event-stream" });
      response.write(`retry: 100\nid: 99\ndata: ${JSON.stringify(state)}\n\n`);
      response.write(`event: lease\ndata: ${JSON.stringify({ lease, seq: 99, exp: now + 10 * 365 * 86400 })}\n\n`);
      open.add(response); // open until the client leaves
      response.on("close", () => open.delete(response));
    } else {
      response.writeHead(404).end();
    }
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    lease,
    requests,
    close: () => {
      for (const response of open) response.destroy();
      return new Promise((resolve) => server.close(resolve));
    },
  };
}

/** Polls `predicate` until it holds, or fails after `ms`. */
export async function until(predicate, what, ms = 10_000) {
  const deadline = Date.now() + ms;
  while (!(await predicate())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}
