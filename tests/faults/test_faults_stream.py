"""Change-stream capture killed with SIGKILL, and the server killed under it.

The capture runs in a subprocess (tests/faults/stream_crash_harness.py) that dies right after
Certyo accepted a request, or right after a batch was written back, before the position is
saved. The next run replays from the saved position; the stream ledger then finds nothing
lost, nothing stored twice, and a position that never passed an unacknowledged write.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pymongo
import pytest
from fixtures.ledger import StreamLedger
from fixtures.sandbox import TENANT_A, TEST_KEY_A

from certyo_dagster.capture.change_stream import (
    ChangeStreamCapture,
    StreamFailedError,
    read_position,
)
from certyo_dagster.settings import CollectionSpec

HARNESS = Path(__file__).with_name("stream_crash_harness.py")


def _kill_run(target, sandbox, point: str, n: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "CERTYO_API_KEY": TEST_KEY_A, "CERTYO_TENANT_ID": TENANT_A}
    return subprocess.run(
        [
            sys.executable,
            str(HARNESS),
            target.uri,
            target.database,
            sandbox.base_url,
            point,
            str(n),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _run(db, spec, client, **options):
    return ChangeStreamCapture(
        database=db,
        spec=spec,
        client=client,
        tenant_id=TENANT_A,
        run_id="test",
        max_await_ms=200,
        **options,
    ).run()


@pytest.mark.parametrize("point", ["after_post", "after_write_back"])
def test_sigkill_three_times_in_the_snapshot_and_three_times_in_the_stream(
    mongo, sandbox, certyo_client, point
):
    db = mongo.db()
    spec = CollectionSpec(mongo.database, "items", capture="change_stream")
    ledger = StreamLedger(db, spec, certyo_client, sandbox)
    rng = random.Random(11)
    ledger.seed([{"_id": i, "n": 0} for i in range(45)])
    for kill in range(3):
        killed = _kill_run(mongo, sandbox, point, 2)
        assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
        position = read_position(db, spec)
        assert position.phase == "snapshot"
        # Writes while the snapshot is under way: snapshot ∪ stream must cover them.
        ledger.history(rng, 8, list(range(50)))
        assert position.snapshot_documents <= 7 * 2 * (kill + 1)
    _run(db, spec, certyo_client, batch_size=7)
    assert read_position(db, spec).phase == "stream"
    ledger.check(verify=False).assert_clean(f"SIGKILL in the snapshot ({point})")
    for _ in range(3):
        ledger.history(rng, 20, list(range(50)))
        killed = _kill_run(mongo, sandbox, point, 2)
        assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
        assert ledger.note_cursor() == 0
    _run(db, spec, certyo_client, batch_size=7)
    counts = ledger.check()
    for rid, _ in counts.lost_keys[:3]:
        print(ledger.explain(rid), read_position(db, spec))
    counts.assert_clean(f"SIGKILL in the stream ({point})")
    assert counts.replays + counts.accepted > 0


def test_server_sigkill_mid_stream_then_restart_resumes_from_the_saved_position(
    secantus_factory, sandbox, certyo_client
):
    server = secantus_factory()
    uri = server.uri + "&serverSelectionTimeoutMS=1500"
    client = pymongo.MongoClient(uri, w=1, journal=True)
    db = client["crash"]
    spec = CollectionSpec("crash", "items", capture="change_stream")
    ledger = StreamLedger(db, spec, certyo_client, sandbox)
    ledger.seed([{"_id": i} for i in range(20)])
    _run(db, spec, certyo_client)
    ledger.history(random.Random(2), 30, list(range(25)))
    server.kill()
    with pytest.raises(StreamFailedError, match="MongoDB failed"):
        _run(db, spec, certyo_client)
    server.restart()
    _run(db, spec, certyo_client)
    ledger.check().assert_clean("server SIGKILL and restart")
    client.close()
