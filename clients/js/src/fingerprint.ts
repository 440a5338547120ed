import { execFile } from "node:child_process";
import { createHash } from "node:crypto";
import { readFile } from "node:fs/promises";

/**
 * This machine's fingerprint, as the broker expects it in an activation and in a machine's leases:
 * the lowercase hex SHA-256 of the app's own salt (its app id) followed by the OS machine id.
 *
 * The OS machine id survives reboots and reinstalls of the app (it is the operating system's,
 * made at its installation): `/etc/machine-id` (or `/var/lib/dbus/machine-id`) on Linux, the
 * `IOPlatformUUID` of `ioreg` on macOS, `MachineGuid` under HKLM\SOFTWARE\Microsoft\Cryptography on
 * Windows. It never leaves the machine: only the salted hash does, so two apps (two salts) on one
 * machine cannot be linked by their fingerprints. The Python client computes the same value.
 */

export const LINUX_PATHS = ["/etc/machine-id", "/var/lib/dbus/machine-id"];

/**
 * The operating system's machine id could not be read (an unsupported system, a container without
 * /etc/machine-id): pass `machineId` yourself.
 */
export class MachineIdError extends Error {
  override name = "MachineIdError";
}

/** Runs a program and gives its standard output (replaceable in tests). */
export type Exec = (file: string, args: string[]) => Promise<string>;

const exec: Exec = (file, args) =>
  new Promise((resolve, reject) => {
    execFile(file, args, { timeout: 10_000, windowsHide: true }, (error, stdout) => (error ? reject(error) : resolve(String(stdout))));
  });

export interface MachineIdOptions {
  linuxPaths?: readonly string[];
  exec?: Exec;
}

/** The operating system's own id of this machine (raw: hash it before it leaves the machine). */
export async function osMachineId(platform: string = process.platform, options: MachineIdOptions = {}): Promise<string> {
  const run = options.exec ?? exec;
  if (platform === "linux") return firstFile(options.linuxPaths ?? LINUX_PATHS);
  if (platform === "darwin") {
    const out = await run("ioreg", ["-rd1", "-c", "IOPlatformExpertDevice"]).catch((error: Error) => {
      throw new MachineIdError(`ioreg: ${error.message}`);
    });
    const found = /"IOPlatformUUID"\s*=\s*"([^"]+)"/.exec(out);
    if (!found?.[1]) throw new MachineIdError("ioreg printed no IOPlatformUUID");
    return found[1];
  }
  if (platform === "win32") {
    // reg.exe of System32 by its full path, and the 64-bit view (/reg:64) from a 32-bit process too.
    const reg = `${process.env.SystemRoot ?? "C:\\Windows"}\\System32\\reg.exe`;
    const args = ["query", "HKEY_LOCAL_MACHINE\\SOFTWARE\\Microsoft\\Cryptography", "/v", "MachineGuid", "/reg:64"];
    const out = await run(reg, args).catch((error: Error) => {
      throw new MachineIdError(`MachineGuid: ${error.message}`);
    });
    const found = /MachineGuid\s+REG_SZ\s+(\S+)/i.exec(out);
    if (!found?.[1]) throw new MachineIdError("reg printed no MachineGuid");
    return found[1];
  }
  throw new MachineIdError(`no machine id known for ${JSON.stringify(platform)}: pass machineId`);
}

async function firstFile(paths: readonly string[]): Promise<string> {
  for (const path of paths) {
    try {
      const text = (await readFile(path, "ascii")).trim();
      // systemd writes "uninitialized" until the first boot completes.
      if (text && text !== "uninitialized") return text;
    } catch {
      // the next one
    }
  }
  throw new MachineIdError(`none of ${paths.join(", ")} holds a machine id`);
}

/** hex SHA-256 of `appId` then the OS machine id (trimmed, lowercase), as UTF-8. */
export async function machineFingerprint(appId: string, options: { machineId?: string } & MachineIdOptions = {}): Promise<string> {
  if (!appId) throw new TypeError("appId: your app's own salt (e.g. \"com.example.draw\"): never empty");
  const raw = options.machineId ?? (await osMachineId(process.platform, options));
  const normalised = raw.trim().toLowerCase();
  if (!normalised) throw new MachineIdError("the machine id is empty");
  return createHash("sha256").update(appId + normalised, "utf8").digest("hex");
}
