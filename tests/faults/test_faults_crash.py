"""Fault matrix: the run's process is SIGKILLed at each dangerous point, then the job re-runs.

The run executes in a subprocess (tests/faults/crash_harness.py) against a SecantusDB server of
this test's own, which both processes talk to, and the HTTP sandbox in this process. Nothing in
the product knows about the kill: the harness wraps the Certyo client or the ingestor in its
own process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from fixtures.ledger import LossLedger, change_history, drive
from fixtures.pipeline import START, hour, make_pipeline, pk
from fixtures.sandbox import TENANT_A, TEST_KEY_A

from certyo_dagster.source.mongo import close_all_clients, open_client

HARNESS = Path(__file__).with_name("crash_harness.py")


def _server_pipeline(server, sandbox):
    # The harness hard-codes productdb; the server is this test's own, so the name is free.
    uri = server.uri
    mongo = SimpleNamespace(uri=uri, database="productdb", db=lambda: open_client(uri)["productdb"])
    return make_pipeline(mongo, sandbox)


def _run_and_kill(pipeline, partition_key: str, point: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CERTYO_API_KEY": TEST_KEY_A, "CERTYO_TENANT_ID": TENANT_A}
    return subprocess.run(
        [
            sys.executable,
            str(HARNESS),
            pipeline.resources["mongo"].uri,
            pipeline.sandbox.base_url,
            START.isoformat(),
            partition_key,
            point,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


@pytest.fixture
def own_server(secantus_factory, sandbox):
    close_all_clients()
    yield _server_pipeline(secantus_factory(), sandbox)
    close_all_clients()


@pytest.mark.parametrize("point", ["after_post", "after_write_back", "mid_partition"])
def test_sigkill_at_each_dangerous_point_then_the_rerun_loses_and_duplicates_nothing(
    own_server, point
):
    pipeline = own_server
    products = pipeline.db["products"]
    ledger = LossLedger(
        pipeline.db, pipeline.spec(), pipeline.resources["certyo"].get_client(), pipeline.sandbox
    )
    history = change_history(hour(1), documents=30, versions=2, poison=1)
    ledger.apply(history[0])
    tick = pipeline.tick()
    assert [r.partition_key for r in tick.run_requests] == [pk(1)]
    window = products.count_documents({})

    killed = _run_and_kill(pipeline, pk(1), point)

    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    stored = pipeline.sandbox.stats()["records_stored"]
    pending = products.count_documents({"certyo_status": "pending"})
    if point == "after_post":
        assert stored >= 13 and pending == 0  # accepted by Certyo, nothing written back
    elif point == "after_write_back":
        assert stored == pending == window - 1  # all but the poison document
    else:
        assert 0 < stored < window - 1
    # The sensor's position never passes what the killed run did not write back.
    tick = pipeline.tick(cursor=tick.cursor)
    assert ledger.note_cursor() == 0
    if point == "after_write_back":
        # Everything was written back (one poison version was dead-lettered): nothing to rerun.
        assert not tick.run_requests
    else:
        assert [r.partition_key for r in tick.run_requests] == [pk(1)]

    cursor, failed = drive(pipeline, ledger, tick.cursor)
    assert not failed
    ledger.apply(history[1])
    cursor, failed = drive(pipeline, ledger, cursor)
    assert not failed

    counts = ledger.check()
    counts.assert_clean(f"4 SIGKILL {point}")
    if point == "after_post":
        assert counts.replays >= 13  # the accepted batch came back as replays
