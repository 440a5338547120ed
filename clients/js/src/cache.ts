import { mkdir, open, readFile, rename, rm } from "node:fs/promises";
import { basename, dirname, join } from "node:path";

/** A crash leaves the old file or the new one, never half of one. */
export async function writeAtomically(path: string, text: string): Promise<void> {
  await mkdir(dirname(path), { recursive: true });
  const tmp = join(dirname(path), `.${basename(path)}.${process.pid}.${Date.now()}.${Math.random().toString(36).slice(2)}`);
  const file = await open(tmp, "w", 0o600);
  try {
    await file.writeFile(text, "ascii");
    await file.sync();
  } finally {
    await file.close();
  }
  try {
    await rename(tmp, path);
  } catch (error) {
    await rm(tmp, { force: true });
    throw error;
  }
}

/**
 * The last valid lease on disk, so that an app started offline knows whether to unlock. The file
 * holds the lease as received (a compact JWS) and nothing else: it is verified again when read,
 * so editing it can only make it invalid. In Electron, put it under app.getPath("userData").
 */
export class LeaseCache {
  constructor(readonly path: string) {}

  async load(): Promise<string | null> {
    try {
      const token = (await readFile(this.path, "ascii")).trim();
      return token || null;
    } catch {
      return null;
    }
  }

  save(token: string): Promise<void> {
    return writeAtomically(this.path, `${token}\n`);
  }

  async clear(): Promise<void> {
    await rm(this.path, { force: true });
  }
}
