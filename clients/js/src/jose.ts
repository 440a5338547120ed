// jose 6 is an ES module only. Loaded with import(), which both builds keep as it is (the
// CommonJS one is compiled with module "node16"), so the CommonJS build works on every Node
// that Electron ships, not only on those whose require() can load ES modules.
export type Jose = typeof import("jose", { with: { "resolution-mode": "import" } });

let loading: Promise<Jose> | undefined;

export function jose(): Promise<Jose> {
  loading ??= import("jose");
  return loading;
}
