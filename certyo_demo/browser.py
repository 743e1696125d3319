"""Headless Chromium against the local Dagster UI: screenshots for the docs, DOM for tests.

Uses Debian's `chromium` package. The flags keep it from reaching any host but 127.0.0.1.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1600,1000",
    "--virtual-time-budget=15000",
]


def chromium_binary() -> str | None:
    """Path of an installed Chromium, or None (`apt-get install -y chromium`)."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def run_chromium(binary: str, *args: str, profile: Path) -> subprocess.CompletedProcess:
    """Chromium with a throwaway profile; `args` e.g. `--dump-dom URL` or `--screenshot=F URL`."""
    return subprocess.run(
        [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
