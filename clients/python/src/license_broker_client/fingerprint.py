"""This machine's fingerprint, as the broker expects it in an activation and in a machine's leases:
the lowercase hex SHA-256 of the app's own salt (its app id) followed by the OS machine id.

The OS machine id survives reboots and reinstalls of the app (it is the operating system's, made
at its installation): `/etc/machine-id` (or `/var/lib/dbus/machine-id`) on Linux, the
`IOPlatformUUID` of `ioreg` on macOS, `MachineGuid` under HKLM\\SOFTWARE\\Microsoft\\Cryptography on
Windows. It never leaves the machine: only the salted hash does, so two apps (two salts) on one
machine cannot be linked by their fingerprints. The JS client computes the same value."""

from __future__ import annotations

import hashlib
import importlib
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

LINUX_PATHS = ("/etc/machine-id", "/var/lib/dbus/machine-id")
_IOREG_UUID = re.compile(r'"IOPlatformUUID"\s*=\s*"([^"]+)"')


class MachineIdUnavailable(RuntimeError):
    """The operating system's machine id could not be read (an unsupported system, a container
    without /etc/machine-id): pass `machine_id=` yourself."""


def machine_fingerprint(app_id: str, *, machine_id: str | None = None) -> str:
    """hex SHA-256 of `app_id` then the OS machine id (trimmed, lowercase), as UTF-8."""
    if not app_id:
        raise ValueError("app_id: your app's own salt (e.g. 'com.example.draw'): never empty")
    raw = os_machine_id() if machine_id is None else machine_id
    normalised = raw.strip().lower()
    if not normalised:
        raise MachineIdUnavailable("the machine id is empty")
    return hashlib.sha256((app_id + normalised).encode()).hexdigest()


def os_machine_id(platform: str = sys.platform, *, linux_paths: Sequence[str] = LINUX_PATHS) -> str:
    """The operating system's own id of this machine (raw: hash it before it leaves the machine)."""
    if platform.startswith("linux"):
        return _first_file(linux_paths)
    if platform == "darwin":
        return _ioreg()
    if platform == "win32":
        return _machine_guid()
    raise MachineIdUnavailable(f"no machine id known for {platform!r}: pass machine_id=")


def _first_file(paths: Sequence[str]) -> str:
    for path in paths:
        try:
            text = Path(path).read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            continue
        # systemd writes "uninitialized" until the first boot completes.
        if text and text != "uninitialized":
            return text
    raise MachineIdUnavailable(f"none of {', '.join(paths)} holds a machine id")


def _ioreg() -> str:
    try:
        out = subprocess.run(
            ["ioreg", "-rd1", "-c", "IOPlatformExpertDevice"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise MachineIdUnavailable(f"ioreg: {exc}") from None
    found = _IOREG_UUID.search(out)
    if found is None:
        raise MachineIdUnavailable("ioreg printed no IOPlatformUUID")
    return found.group(1)


def _machine_guid() -> str:
    try:
        winreg: Any = importlib.import_module("winreg")  # Windows only
        # The 64-bit view, also from a 32-bit Python: the key is not mirrored for WOW64.
        access = winreg.KEY_READ | winreg.KEY_WOW64_64KEY
        with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, r"SOFTWARE\Microsoft\Cryptography", 0, access) as key:
            value, _ = winreg.QueryValueEx(key, "MachineGuid")
    except (ImportError, OSError) as exc:
        raise MachineIdUnavailable(f"MachineGuid: {exc}") from None
    return str(value)
