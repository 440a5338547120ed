"""The npm package clients/js (license-broker-client), built by `make test` (npm ci, tsc), runs its
own tests with `node --test` against real servers started here: four deployments on one
database, for the lease, the rotation and the reconnect tests (clients/js/test/server.test.mjs).
Then the Electron example's main-process code (examples/electron/license.js) runs the same way,
with the built package installed beside it."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

from broker.leases import LeaseKeys, private_pem, public_pem
from license_broker.embedded import create_app
from tests.support.licenses import make_settings
from tests.support.processes import ROOT, run_module, serving
from tests.support.services import unavailable

JS = ROOT / "clients" / "js"
EXAMPLE = ROOT / "examples" / "electron"


def node_tests() -> list[str]:
    node = shutil.which("node")
    if node is None:
        unavailable("node", FileNotFoundError("node"))
    if not (JS / "dist" / "esm" / "index.js").exists() or not (JS / "dist" / "cjs" / "index.js").exists():
        unavailable("the built JS client", FileNotFoundError(f"{JS}/dist (make test runs npm ci, which builds it)"))
    tests = sorted(str(p.relative_to(JS)) for p in (JS / "test").glob("*.test.*js"))
    assert {"test/server.test.mjs", "test/cjs.test.cjs", "test/fake-broker.test.mjs"} <= set(tests)
    return tests


async def test_the_js_client_passes_its_node_tests_against_running_servers(sqlite_url: str, tmp_path: Path) -> None:
    tests = node_tests()
    key_a, key_b = LeaseKeys.generate(), LeaseKeys.generate()
    rotating = key_b.with_published(key_a.signing.public_key())
    # What an operator pins during the rotation: exactly what `keys public` prints for its setting.
    setting = private_pem(key_b.signing) + public_pem(key_a.signing.public_key())
    printed = run_module("license_broker", "keys", "public", env={"LICENSE_SIGNING_KEY": setting})
    assert printed.returncode == 0, printed.stderr
    async with (
        serving(create_app(make_settings(sqlite_url, dev=True, lease_keys=key_a))) as url,
        serving(create_app(make_settings(sqlite_url, dev=True, lease_keys=rotating))) as url_rotating,
        serving(create_app(make_settings(sqlite_url, dev=True, lease_keys=key_b))) as url_rotated,
        serving(
            create_app(make_settings(sqlite_url, dev=True, lease_keys=key_a, max_connection_lifetime=0.3, retry_ms=100))
        ) as url_short,
    ):
        env = {
            **os.environ,
            "BROKER_URL": url,
            "BROKER_URL_ROTATING": url_rotating,
            "BROKER_URL_ROTATED": url_rotated,
            "BROKER_URL_SHORT": url_short,
            "LEASE_PUBLIC_KEY_A": public_pem(key_a.signing.public_key()),
            "LEASE_KEYS_PUBLIC": printed.stdout,
        }
        report = await run_node_tests(tests, JS, env)
    (tmp_path / "node-test.txt").write_text(report)
    assert "\n# skipped 0" in report, report  # the server tests ran: BROKER_URL was set


async def run_node_tests(tests: list[str], cwd: Path, env: dict[str, str]) -> str:
    """`node --test` (TAP); the report, once every test passed."""
    proc = await asyncio.create_subprocess_exec(
        "node",
        "--test",
        "--test-reporter=tap",
        *tests,
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(proc.communicate(), 100)
    except TimeoutError:
        proc.kill()
        output, _ = await proc.communicate()
        raise AssertionError(f"node --test timed out:\n{output.decode()}") from None
    report = output.decode()
    assert proc.returncode == 0, report
    assert "\n# fail 0" in report, report
    return report


async def test_the_electron_examples_main_process_code_unlocks_gates_and_holds_offline(
    sqlite_url: str, tmp_path: Path
) -> None:
    node_tests()
    app = tmp_path / "electron"
    app.mkdir()
    for name in ("package.json", "main.js", "config.js", "config.test.mjs", "license.js", "license.test.mjs"):
        shutil.copy(EXAMPLE / name, app / name)
    # What `npm install` of "file:../../clients/js" makes: a link to the built package.
    (app / "node_modules").mkdir()
    (app / "node_modules" / "license-broker-client").symlink_to(JS, target_is_directory=True)
    key = LeaseKeys.generate()
    async with serving(create_app(make_settings(sqlite_url, dev=True, lease_keys=key))) as url:
        env = {**os.environ, "BROKER_URL": url, "LEASE_PUBLIC_KEY_A": public_pem(key.signing.public_key())}
        report = await run_node_tests(["config.test.mjs", "license.test.mjs"], app, env)
    assert "\n# pass 6" in report and "\n# skipped 0" in report, report
