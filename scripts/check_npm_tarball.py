"""`make dist`'s check of an `npm pack` tarball, what `twine check` is to a wheel: its package.json
is complete (name, version, license, description, engines), every file its entry points name
(`main`, `types`, each `exports` condition) is in the tarball, each build directory says its module
type, and it ships nothing it should not (tests, node_modules, build stamps, lock files)."""

from __future__ import annotations

import json
import sys
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

REQUIRED = ("name", "version", "description", "license", "engines", "main", "types", "exports")
# Path parts a published package should not hold: dependencies, tests, dotfiles (build stamps),
# the lock file (npm ignores a dependency's lock) and the TypeScript build configuration.
NEVER_PARTS = ("node_modules", "test", "tests", "package-lock.json")
NEVER_PREFIXES = (".", "tsconfig")


def _targets(exports: Any) -> Iterator[str]:
    """Every file path an `exports` map can resolve to."""
    if isinstance(exports, str):
        yield exports
    elif isinstance(exports, dict):
        for value in exports.values():
            yield from _targets(value)


def problems(tarball: Path) -> list[str]:
    with tarfile.open(tarball) as tar:
        names = {m.name.removeprefix("package/") for m in tar.getmembers() if m.isfile()}
        manifest = tar.extractfile("package/package.json")
        if manifest is None:
            return ["no package/package.json"]
        package: dict[str, Any] = json.load(manifest)
        found: list[str] = []
        for field in REQUIRED:
            if not package.get(field):
                found.append(f"package.json has no {field}")
        if "README.md" not in names:
            found.append("no README.md")
        for target in {package.get("main"), package.get("types"), *_targets(package.get("exports"))}:
            if isinstance(target, str) and target.removeprefix("./") not in names:
                found.append(f"{target} is named by package.json but is not in the tarball")
        for build, kind in (("dist/esm", "module"), ("dist/cjs", "commonjs")):
            # The package has no "type": each build directory's own package.json says what it is.
            if any(n.startswith(build + "/") for n in names):
                inner = tar.extractfile(f"package/{build}/package.json") if f"{build}/package.json" in names else None
                if inner is None or json.load(inner).get("type") != kind:
                    found.append(f"{build}/package.json does not say type {kind!r}")
        for name in sorted(names):
            if any(part in NEVER_PARTS or part.startswith(NEVER_PREFIXES) for part in name.split("/")):
                found.append(f"{name} should not be shipped")
    return found


def main(argv: Sequence[str] | None = None) -> int:
    tarballs = [Path(a) for a in (sys.argv[1:] if argv is None else argv)]
    if not tarballs:
        print("usage: python -m scripts.check_npm_tarball PACKAGE.tgz ...", file=sys.stderr)
        return 2
    failed = False
    for tarball in tarballs:
        found = problems(tarball)
        failed = failed or bool(found)
        print(f"Checking {tarball}: " + ("PASSED" if not found else "FAILED\n  " + "\n  ".join(found)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
