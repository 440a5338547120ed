// Shared by the tests: leases signed the way the broker signs them, and a tiny JWKS server.
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

/** Replaces one claim of a signed lease, keeping its signature (what a user editing it would do). */
export function tamper(token, changes) {
  const [header, payload, signature] = token.split(".");
  const claims = { ...JSON.parse(Buffer.from(payload, "base64url").toString()), ...changes };
  return `${header}.${Buffer.from(JSON.stringify(claims)).toString("base64url")}.${signature}`;
}

/** Serves `keys()` as a JWKS; counts the fetches. */
export async function jwksServer(keys) {
  const served = { fetches: 0 };
  const server = createServer((request, response) => {
    served.fetches += 1;
    response.writeHead(200, { "content-type": "application/json" });
    response.end(JSON.stringify({ keys: keys() }));
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  served.url = `http://127.0.0.1:${server.address().port}/.well-known/jwks.json`;
  served.close = () => new Promise((resolve) => server.close(resolve));
  return served;
}

/** Polls `predicate` until it holds, or fails after `ms`. */
export async function until(predicate, what, ms = 10_000) {
  const deadline = Date.now() + ms;
  while (!(await predicate())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}
