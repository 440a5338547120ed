import { mkdir, open, readFile, rename, rm } from "node:fs/promises";
import { basename, dirname, join } from "node:path";

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

  /** Atomically: a crash leaves the old lease or the new one, never half of one. */
  async save(token: string): Promise<void> {
    await mkdir(dirname(this.path), { recursive: true });
    const tmp = join(dirname(this.path), `.${basename(this.path)}.${process.pid}.${Date.now()}`);
    const file = await open(tmp, "w", 0o600);
    try {
      await file.writeFile(`${token}\n`, "ascii");
      await file.sync();
    } finally {
      await file.close();
    }
    try {
      await rename(tmp, this.path);
    } catch (error) {
      await rm(tmp, { force: true });
      throw error;
    }
  }

  async clear(): Promise<void> {
    await rm(this.path, { force: true });
  }
}
