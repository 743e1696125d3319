"""Fault matrix: crashes. The run's process is SIGKILLed at each dangerous point, and MongoDB
itself is SIGKILLed and restarted in the middle of a run and of a sensor tick.

A killed run executes in a subprocess (tests/faults/crash_harness.py) against the test's
database; nothing in the product knows about the kill: the harness wraps the Certyo client or
the ingestor in its own process. A killed MongoDB is a SecantusDB of the test's own
(`secantus_factory`) that syncs each commit, so it keeps every acknowledged write across
SIGKILL as mongod with journaling does; fail points hold the command the kill interrupts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
from fixtures.faults import FAST_FAILURE, FAULT_BATCHES, answered, step_message, when
from fixtures.ledger import LossLedger, change_history, drive
from fixtures.mongo import DATABASE_PREFIX, MongoTarget, open_fail_points, with_options
from fixtures.pipeline import START, hour, make_pipeline, pk
from fixtures.sandbox import TENANT_A, TEST_KEY_A
from pymongo.errors import PyMongoError

from certyo_dagster.source.mongo import close_all_clients

HARNESS = Path(__file__).with_name("crash_harness.py")


def _run_and_kill(pipeline, partition_key: str, point: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CERTYO_API_KEY": TEST_KEY_A, "CERTYO_TENANT_ID": TENANT_A}
    mongo = pipeline.resources["mongo"]
    return subprocess.run(
        [
            sys.executable,
            str(HARNESS),
            mongo.uri,
            mongo.database,
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


def _ledger(pipeline) -> LossLedger:
    return LossLedger(
        pipeline.db, pipeline.spec(), pipeline.resources["certyo"].get_client(), pipeline.sandbox
    )


@pytest.mark.parametrize("point", ["after_post", "after_write_back", "mid_partition"])
def test_sigkill_at_each_dangerous_point_then_the_rerun_loses_and_duplicates_nothing(
    pipeline, point
):
    products = pipeline.db["products"]
    ledger = _ledger(pipeline)
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
        # The first bulk call (at most batch_size 13 records; the poison document is set
        # aside before it) was accepted by Certyo, and nothing was written back.
        assert 0 < stored <= 13 and pending == 0
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


# -- MongoDB killed and restarted ------------------------------------------------------------


@pytest.fixture
def crashable(secantus_factory, sandbox):
    """A pipeline on a SecantusDB of this test's own, with fail points and durable commits."""
    server = secantus_factory(test_commands=True)
    close_all_clients()
    # No socket timeout: a command the fail point holds waits until the kill cuts it.
    options = {k: v for k, v in FAST_FAILURE.items() if k != "socketTimeoutMS"}
    target = MongoTarget(
        with_options(server.uri, **options), f"{DATABASE_PREFIX}{uuid.uuid4().hex[:12]}"
    )
    points, admin = open_fail_points(target.uri)
    try:
        yield server, make_pipeline(target, sandbox), points
    finally:
        admin.close()
        close_all_clients()
        target.close()


def _restart(server, points) -> None:
    """Start the killed server again on its port and storage; fail points die with it."""
    server.start()
    points.off()  # the admin client reconnects; a fresh server has none armed anyway


@pytest.mark.timeout(300)
def test_mongodb_killed_mid_write_back_and_restarted_loses_and_duplicates_nothing(crashable):
    server, pipeline, points = crashable
    ledger = _ledger(pipeline)
    history = change_history(hour(1), documents=30, versions=2, poison=1)
    ledger.apply(history[0])
    written = pipeline.db["products"].count_documents({})
    tick = pipeline.tick()
    key = tick.run_requests[0].partition_key

    # MongoDB holds the first write-back; it is killed once Certyo has answered that batch.
    points.arm("alwaysOn", commands=["update"], blockConnection=True, blockTimeMS=3000)
    before = answered(pipeline.sandbox)
    kill = when(lambda: answered(pipeline.sandbox) > before, server.kill)
    result = pipeline.materialize(key, config=FAULT_BATCHES, raise_on_error=False)
    kill.join(timeout=30)

    assert kill.fired
    assert not result.success
    assert "MongoDB failed: " in step_message(result)
    assert answered(pipeline.sandbox) > before  # Certyo holds versions MongoDB never marked
    _restart(server, points)
    # Every acknowledged write survived the SIGKILL, and none of the interrupted write-back.
    assert pipeline.db["products"].count_documents({}) == written
    assert pipeline.db["products"].count_documents({"certyo_status": "pending"}) == 0
    assert ledger.note_cursor() == 0

    cursor, failed = drive(pipeline, ledger, tick.cursor, config=FAULT_BATCHES)
    assert not failed
    ledger.apply(history[1])
    cursor, failed = drive(pipeline, ledger, cursor, config=FAULT_BATCHES)
    assert not failed

    counts = ledger.check()
    counts.assert_clean("4b MongoDB SIGKILL mid write-back")
    assert counts.replays > 0  # what Certyo accepted before the kill came back as replays


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "command",
    [
        "find",  # the tick reading its position and scanning the lookback
        "update",  # the scan done, the tick writing its position to _certyo_cursors
    ],
)
def test_mongodb_killed_mid_sensor_tick_and_restarted_keeps_the_position_safe(crashable, command):
    server, pipeline, points = crashable
    ledger = _ledger(pipeline)
    history = change_history(hour(1), documents=30, versions=3, poison=1)
    ledger.apply(history[0])
    cursor, failed = drive(pipeline, ledger, config=FAULT_BATCHES)
    assert not failed
    ledger.apply(history[1])

    points.arm({"times": 1}, commands=[command], blockConnection=True, blockTimeMS=5000)
    timer = threading.Timer(1.5, server.kill)
    timer.start()
    try:
        with pytest.raises(Exception) as caught:
            pipeline.tick(cursor=cursor)
    finally:
        timer.join()
    assert _caused_by(caught.value, PyMongoError), caught.value

    _restart(server, points)
    assert ledger.note_cursor() == 0
    # The tick that died returned no cursor: the next one starts from the last one returned.
    tick = pipeline.tick(cursor=cursor)
    assert tick.run_requests
    cursor, failed = drive(pipeline, ledger, cursor, config=FAULT_BATCHES)
    assert not failed
    ledger.apply(history[2])
    cursor, failed = drive(pipeline, ledger, cursor, config=FAULT_BATCHES)
    assert not failed
    ledger.check().assert_clean(f"4c MongoDB SIGKILL mid sensor tick ({command})")


def _caused_by(error: BaseException | None, kind: type) -> bool:
    while error is not None:
        if isinstance(error, kind):
            return True
        error = error.__cause__ or error.__context__
    return False
