import { createHash, createPublicKey, type KeyObject } from "node:crypto";

/**
 * The lease keys an app pins: what `license-broker keys public` prints (a `# kid ...` comment line
 * before each PEM public key, one key or several during a rotation), read from its file as one
 * string or given as several; or a JWKS document shipped with the app (`keys public --jwks`).
 *
 * Read with node:crypto, synchronously, so that a key the client cannot use fails the constructor
 * that was given it: a key that silently verifies nothing would leave the app locked with no error.
 */

export interface JsonWebKeySet {
  keys: Array<Record<string, unknown>>;
}

/** A pinned key that cannot verify leases. The message never quotes key material. */
export class InvalidKeyError extends TypeError {
  override name = "InvalidKeyError";
}

const PEM_BLOCK = /-----BEGIN ([A-Z0-9 ]+)-----[\s\S]+?-----END \1-----/g;

/** The broker's `kid`: the RFC 7638 thumbprint of the key, so a pinned key needs no name. */
export function keyId(key: KeyObject): string {
  const { x } = key.export({ format: "jwk" });
  return createHash("sha256").update(`{"crv":"Ed25519","kty":"OKP","x":"${String(x)}"}`).digest("base64url");
}

function ed25519(key: KeyObject, what: string): KeyObject {
  if (key.asymmetricKeyType !== "ed25519") {
    throw new InvalidKeyError(`${what} must be an Ed25519 public key (\`license-broker keys public\`), not ${key.asymmetricKeyType}`);
  }
  return key;
}

/** Every PEM block of the text; lines outside the blocks (comments) are ignored. */
export function keysOfPem(text: string): KeyObject[] {
  if (typeof text !== "string") throw new InvalidKeyError(`a pinned key must be PEM text, not ${typeof text}`);
  // An environment variable often holds a PEM on one line with literal "\n".
  const blocks = [...text.replaceAll("\\n", "\n").matchAll(PEM_BLOCK)];
  if (blocks.length === 0) {
    throw new InvalidKeyError(
      "no PEM public key in the text given (pin what `license-broker keys public` prints: -----BEGIN PUBLIC KEY----- ...); is the file empty?",
    );
  }
  return blocks.map(([block, label]) => {
    if (label?.includes("PRIVATE")) {
      throw new InvalidKeyError("a private key was given to pin: ship the public key (`license-broker keys public`), never the private one");
    }
    if (label !== "PUBLIC KEY") throw new InvalidKeyError(`a ${label} block: expected a PUBLIC KEY block`);
    let key: KeyObject;
    try {
      key = createPublicKey({ key: block, format: "pem" });
    } catch {
      throw new InvalidKeyError("a PUBLIC KEY block that cannot be read");
    }
    return ed25519(key, "a pinned lease key");
  });
}

export function keysOfJwks(jwks: JsonWebKeySet): KeyObject[] {
  if (!Array.isArray(jwks?.keys) || jwks.keys.length === 0) throw new InvalidKeyError('a pinned JWKS must hold a non-empty "keys" list');
  return jwks.keys.map((jwk) => {
    if (jwk?.kty !== "OKP" || jwk.crv !== "Ed25519") throw new InvalidKeyError("a pinned JWKS may hold only Ed25519 keys (kty OKP, crv Ed25519)");
    let key: KeyObject;
    try {
      key = createPublicKey({ key: { kty: "OKP", crv: "Ed25519", x: String(jwk.x) }, format: "jwk" });
    } catch {
      throw new InvalidKeyError("a pinned JWK that cannot be read");
    }
    return ed25519(key, "a pinned JWK");
  });
}

/** The keys by thumbprint (never by a document's `kid`: a `kid` cannot alias another key). */
export function pinnedKeys(publicKeys: string | readonly string[] | undefined, jwks: JsonWebKeySet | undefined): Map<string, KeyObject> {
  const texts = typeof publicKeys === "string" ? [publicKeys] : (publicKeys ?? []);
  const keys = texts.flatMap((text) => keysOfPem(text));
  if (jwks !== undefined) keys.push(...keysOfJwks(jwks));
  return new Map(keys.map((key) => [keyId(key), key]));
}
