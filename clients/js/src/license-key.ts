import { MalformedLicenseKeyError } from "./errors.js";

/**
 * A license key as the buyer types it, checked here before it is sent (docs/protocol.md, "The
 * license key"): a typo is found at once, offline, and does not count against the broker's limit
 * on failed attempts. The broker makes the same check; the tests compare the two on every typo.
 *
 * 25 characters of Crockford's base32 (no I, L, O, U) in any case, dashes and spaces ignored, O
 * read as 0 and I, L as 1; the last 4 are Reed-Solomon check symbols over GF(32) (x^5 + x^2 + 1,
 * roots a^1..a^4), so any 4 wrong characters, or 2 swapped, fail the check.
 */
const ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ";
const LENGTH = 25;
const IGNORED = /[\s\-\u2010-\u2015\u2212]+/g;
const READ_AS: Record<string, string> = { O: "0", I: "1", L: "1" };

const EXP: number[] = new Array(62).fill(0);
const LOG: number[] = new Array(32).fill(0);
for (let i = 0, x = 1; i < 31; i++) {
  EXP[i] = EXP[i + 31] = x;
  LOG[x] = i;
  x = (x << 1) ^ (x & 16 ? 0b100101 : 0);
}

/** The key, as a polynomial (first character the highest power), vanishes at a^1..a^4. */
function isCodeword(symbols: number[]): boolean {
  for (let root = 1; root <= 4; root++) {
    let value = 0;
    for (const symbol of symbols) value = (value ? (EXP[(LOG[value] as number) + root] as number) : 0) ^ symbol;
    if (value) return false;
  }
  return true;
}

/**
 * The key as the broker reads it, shown in five groups of five (`PY9W9-WM8F2-...`), or
 * MalformedLicenseKeyError (nothing is sent).
 */
export function normalizeLicenseKey(text: string): string {
  if (typeof text !== "string" || text.length > 100) throw new MalformedLicenseKeyError("malformed key: too long");
  const key = text.replace(IGNORED, "").toUpperCase().replace(/[OIL]/g, (c) => READ_AS[c] as string);
  if (key.length !== LENGTH) throw new MalformedLicenseKeyError(`malformed key: ${LENGTH} characters expected, ${key.length} given`);
  const symbols = [...key].map((c) => ALPHABET.indexOf(c));
  if (symbols.some((v) => v < 0)) throw new MalformedLicenseKeyError("malformed key: a character that is not in a key");
  if (!isCodeword(symbols)) throw new MalformedLicenseKeyError("malformed key: check it for a typo");
  return key.match(/.{5}/g)?.join("-") ?? key;
}
