"""Secrets never leak: a job run with a known API key and a MongoDB password in its URI, failing
on Certyo 401, on a wrong MongoDB password and on MongoDB being down, then succeeding, leaves
neither secret anywhere a user could see.

MongoDB is a SecantusDB of the test's own that requires authentication (SCRAM-SHA-256). Its
user's password holds `/`, `?`, `#` and `@`, percent-encoded in the URI as MongoDB's URI
format requires, the characters that make naive URI parsing give up and print it whole.
The runs go through `dagster job execute` with DAGSTER_HOME in a temporary directory, so the
event log, run storage, compute logs and asset metadata are files we can search byte for byte,
together with the CLI's stdout and stderr (which carry the exception texts).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from datetime import datetime
from pathlib import Path
from urllib.parse import quote

import pymongo
import pytest
from fixtures.mongo import DATABASE_PREFIX
from fixtures.sandbox import TENANT_A, TEST_KEY_A

HARNESS = Path(__file__).with_name("secrets_harness.py")
MONGO_USER = "certyo"
MONGO_PASSWORD = "S3cret/Pa55?word#with@signs"
WRONG_PASSWORD = "Wr0ng/Pa55?word#with@signs"


def _uri(port: int, password: str) -> str:
    return (
        f"mongodb://{MONGO_USER}:{quote(password, safe='')}@127.0.0.1:{port}/"
        "?authSource=admin&replicaSet=secantus&serverSelectionTimeoutMS=3000"
    )


# Nothing listens on port 1: a real driver fails server selection, on loopback only.
DEAD_URI = (
    f"mongodb://{MONGO_USER}:{quote(MONGO_PASSWORD, safe='')}@127.0.0.1:1/"
    "?serverSelectionTimeoutMS=300"
)
SECRETS = {
    "api key": TEST_KEY_A.encode(),
    "mongo password": MONGO_PASSWORD.encode(),
    "mongo password, percent-encoded": quote(MONGO_PASSWORD, safe="").encode(),
    "wrong password": WRONG_PASSWORD.encode(),
    "wrong password, percent-encoded": quote(WRONG_PASSWORD, safe="").encode(),
}


@pytest.fixture
def auth_mongo(secantus_factory):
    """A server with one user, created while authentication was off, then restarted with
    --auth; 15 documents in the hour the runs ingest."""
    server = secantus_factory()
    database = f"{DATABASE_PREFIX}{uuid.uuid4().hex[:12]}"
    with pymongo.MongoClient(server.uri) as admin:
        admin.admin.command(
            "createUser",
            MONGO_USER,
            pwd=MONGO_PASSWORD,
            roles=[{"role": "readWrite", "db": database}],
        )
        admin[database]["products"].insert_many(
            [{"_id": f"p{i}", "sku": f"SKU-{i}", "updatedAt": datetime(2026, 11, 1, 1, i)}
             for i in range(15)]
        )  # fmt: skip
    server.auth = True
    server.restart()
    anonymous = pymongo.MongoClient(server.uri, serverSelectionTimeoutMS=3000)
    try:
        with pytest.raises(pymongo.errors.OperationFailure, match="requires authentication"):
            anonymous[database]["products"].find_one()
    finally:
        anonymous.close()
    return server, database


def _execute(home: Path, sandbox, mongo_uri: str, database: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "MONGO_URI": mongo_uri,
        "MONGO_DATABASE": database,
        "CERTYO_API_KEY": TEST_KEY_A,
        "CERTYO_BASE_URL": sandbox.base_url,
        "CERTYO_TENANT_ID": TENANT_A,
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


@pytest.mark.timeout(400)
def test_no_secret_in_event_log_run_storage_compute_logs_metadata_or_output(
    tmp_path, sandbox, auth_mongo
):
    server, database = auth_mongo
    home = tmp_path / "dagster_home"
    home.mkdir()
    outputs: list[bytes] = []

    sandbox.script_faults([{"status": 401, "times": 50}])
    refused = _execute(home, sandbox, _uri(server.port, MONGO_PASSWORD), database)
    sandbox.clear_faults()
    outputs += [refused.stdout, refused.stderr]
    assert refused.returncode != 0
    assert _home_contains(home, b"HTTP 401")

    wrong = _execute(home, sandbox, _uri(server.port, WRONG_PASSWORD), database)
    outputs += [wrong.stdout, wrong.stderr]
    assert wrong.returncode != 0
    # MongoDB refused the login, and the event log says so with the password redacted.
    assert _home_contains(home, b"AuthenticationFailed") or _home_contains(
        home, b"authentication failed"
    )
    assert _home_contains(home, f"{MONGO_USER}:***@127.0.0.1:{server.port}".encode())
    assert sandbox.stats()["records_stored"] == 0

    mongo_down = _execute(home, sandbox, DEAD_URI, database)
    outputs += [mongo_down.stdout, mongo_down.stderr]
    assert mongo_down.returncode != 0
    assert _home_contains(home, b"ServerSelectionTimeoutError")
    assert _home_contains(home, f"{MONGO_USER}:***@127.0.0.1:1".encode())

    succeeded = _execute(home, sandbox, _uri(server.port, MONGO_PASSWORD), database)
    outputs += [succeeded.stdout, succeeded.stderr]
    assert succeeded.returncode == 0, succeeded.stderr[-3000:]
    assert sandbox.stats()["records_stored"] == 15
    with pymongo.MongoClient(_uri(server.port, MONGO_PASSWORD)) as client:
        assert client[database]["products"].count_documents({"certyo_status": "pending"}) == 15

    # The runs left an event log and compute logs to search.
    assert list(home.rglob("*.db")) or list(home.rglob("*.sqlite"))
    assert list(home.rglob("*.err")) or list(home.rglob("*.out"))
    assert _home_contains(home, f"{database}/products".encode())  # the search reads the log
    assert _leaks(home, outputs) == []
