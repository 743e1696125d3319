"""Secrets never leak: a job run with a known API key and a MongoDB password in its URI, failing
on Certyo 401 and on MongoDB, then succeeding, leaves neither secret anywhere a user could see.

The runs go through `dagster job execute` with DAGSTER_HOME in a temporary directory, so the
event log, run storage, compute logs and asset metadata are files we can search byte for byte,
together with the CLI's stdout and stderr (which carry the exception texts).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures.sandbox import TENANT_A, TEST_KEY_A

HARNESS = Path(__file__).with_name("secrets_harness.py")
MONGO_PASSWORD = "S3cretPassw0rd"
MOCK_URI = f"mongodb://certyo:{MONGO_PASSWORD}@mongo.test:27017/"
# Nothing listens on port 1: a real driver fails server selection, on loopback only.
DEAD_URI = f"mongodb://certyo:{MONGO_PASSWORD}@127.0.0.1:1/?serverSelectionTimeoutMS=300"
SECRETS = {"api key": TEST_KEY_A.encode(), "mongo password": MONGO_PASSWORD.encode()}


def _execute(home: Path, sandbox, mongo_uri: str, mock: bool) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "MONGO_URI": mongo_uri,
        "CERTYO_API_KEY": TEST_KEY_A,
        "CERTYO_BASE_URL": sandbox.base_url,
        "CERTYO_TENANT_ID": TENANT_A,
        "HARNESS_MOCK_MONGO": "1" if mock else "0",
    }
    args = [sys.executable, "-m", "dagster", "job", "execute", "-f", str(HARNESS),
            "-j", "ingest_products",
            "--tags", json.dumps({"dagster/partition": "2026-11-01-01:00"})]  # fmt: skip
    return subprocess.run(args, env=env, capture_output=True, timeout=240, cwd=home)


def _home_contains(home: Path, text: bytes) -> bool:
    return any(text in p.read_bytes() for p in home.rglob("*") if p.is_file())


def _leaks(home: Path, outputs: list[bytes]) -> list[str]:
    found = []
    for path in home.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            found += [f"{what} in {path}" for what, s in SECRETS.items() if s in data]
    for i, output in enumerate(outputs):
        found += [f"{what} in output {i}" for what, s in SECRETS.items() if s in output]
    return found


@pytest.mark.timeout(300)
def test_no_secret_in_event_log_run_storage_compute_logs_metadata_or_output(tmp_path, sandbox):
    home = tmp_path / "dagster_home"
    home.mkdir()
    outputs: list[bytes] = []

    sandbox.script_faults([{"status": 401, "times": 50}])
    refused = _execute(home, sandbox, MOCK_URI, mock=True)
    sandbox.clear_faults()
    outputs += [refused.stdout, refused.stderr]
    assert refused.returncode != 0
    assert _home_contains(home, b"HTTP 401")

    mongo_down = _execute(home, sandbox, DEAD_URI, mock=False)
    outputs += [mongo_down.stdout, mongo_down.stderr]
    assert mongo_down.returncode != 0
    # The failure is explained in the event log, with the URI's password redacted.
    assert _home_contains(home, b"ServerSelectionTimeoutError")
    assert _home_contains(home, b"certyo:***@127.0.0.1:1")

    succeeded = _execute(home, sandbox, MOCK_URI, mock=True)
    outputs += [succeeded.stdout, succeeded.stderr]
    assert succeeded.returncode == 0, succeeded.stderr[-3000:]
    assert sandbox.stats()["records_stored"] == 15

    # The runs left an event log and compute logs to search.
    assert list(home.rglob("*.db")) or list(home.rglob("*.sqlite"))
    assert list(home.rglob("*.err")) or list(home.rglob("*.out"))
    assert _home_contains(home, b"productdb/products")  # the search does read the event log
    assert _leaks(home, outputs) == []
