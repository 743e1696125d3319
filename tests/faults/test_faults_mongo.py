"""Fault matrix, MongoDB side: real faults from the server and the network, mid-run.

The pipeline reaches MongoDB through a loopback TCP proxy (tests/fixtures/tcp_proxy.py) that
can refuse, cut or stall connections, and the server injects its own faults with `failCommand`
fail points aimed at the pipeline's connections only (their appName), so the test's own reads
and writes of the ledger are never hit. The product is unchanged.

The proxied URI carries FAST_FAILURE (tests/fixtures/faults.py): the driver rediscovers the
server half a second after a not-primary error, and a blocked command times out after 1 s.
"""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
from fixtures.faults import (
    FAST_FAILURE,
    FAULT_BATCHES,
    SOCKET_TIMEOUT_MS,
    answered,
    fail_point_spent,
    step_message,
    through_proxy,
    when,
)
from fixtures.ledger import change_history, drive
from fixtures.pipeline import hour

from certyo_dagster.capture.polling import SCAN_RESUMES, partition_key_for


def window_size(pipeline: Any, partition_key: str) -> int:
    return sum(
        1
        for d in pipeline.db["products"].find()
        if partition_key_for(d["updatedAt"]) == partition_key
    )


@pytest.mark.timeout(300)
def test_mongodb_failing_mid_extraction_resumes_or_fails_clearly_and_loses_nothing(
    pipeline, loss_ledger, mongo, fail_point, tcp_proxy
):
    proxy = tcp_proxy(*mongo.address())
    flaky = through_proxy(pipeline, mongo, proxy)
    history = change_history(hour(1))

    # The connection is closed on three getMores of one scan. The driver never retries a
    # getMore; the scan reopens after the last key read each time and finishes the window.
    loss_ledger.apply(history[0])
    tick = flaky.tick()
    key = tick.run_requests[0].partition_key
    assert window_size(pipeline, key) > (SCAN_RESUMES + 1) * FAULT_BATCHES["batch_size"]
    fail_point.arm({"times": SCAN_RESUMES}, commands=["getMore"], closeConnection=True)
    result = flaky.materialize(key, config=FAULT_BATCHES, raise_on_error=False)
    assert result.success
    assert fail_point_spent(mongo.uri, mongo.database)
    loss_ledger.seen([key])
    stored = pipeline.sandbox.stats()["records_stored"]

    # Shutdown (91), node recovering (11600), primary stepped down (189): the driver retries
    # the read once the server answers again; on a getMore the scan resumes instead.
    for code in (91, 11600, 189):
        fail_point.arm({"times": 1}, commands=["find"], errorCode=code)
        assert flaky.materialize(key, config=FAULT_BATCHES).success, code
        assert fail_point_spent(mongo.uri, mongo.database)
        fail_point.arm({"times": 2}, commands=["getMore"], errorCode=code)
        assert flaky.materialize(key, config=FAULT_BATCHES).success, code
        assert fail_point_spent(mongo.uri, mongo.database)
    assert pipeline.sandbox.stats()["records_stored"] == stored  # nothing shipped twice

    # One failure more than the scan survives: the run fails and names the cause.
    loss_ledger.apply(history[1])
    tick = flaky.tick(cursor=tick.cursor)
    key = tick.run_requests[0].partition_key
    assert window_size(pipeline, key) > (SCAN_RESUMES + 1) * FAULT_BATCHES["batch_size"]
    fail_point.arm({"times": SCAN_RESUMES + 1}, commands=["getMore"], closeConnection=True)
    result = flaky.materialize(key, config=FAULT_BATCHES, raise_on_error=False)
    assert not result.success
    assert "MongoDB failed: AutoReconnect: " in step_message(result)
    assert "connection closed" in step_message(result)
    assert loss_ledger.note_cursor() == 0

    # A refusal the driver must not retry (no privilege): the run fails at once, naming it.
    fail_point.arm({"times": 1}, commands=["find"], errorCode=13)
    result = flaky.materialize(key, config=FAULT_BATCHES, raise_on_error=False)
    assert not result.success
    assert "OperationFailure" in step_message(result) and "Unauthorized" in step_message(result)
    assert loss_ledger.note_cursor() == 0

    # Every getMore hangs past the socket timeout: each NetworkTimeout is resumed, until the
    # scan gives up and the run names the timeout.
    fail_point.arm(
        "alwaysOn", commands=["getMore"], blockConnection=True, blockTimeMS=3 * SOCKET_TIMEOUT_MS
    )
    result = flaky.materialize(key, config=FAULT_BATCHES, raise_on_error=False)
    fail_point.off()
    assert not result.success
    assert "MongoDB failed: NetworkTimeout: " in step_message(result)
    assert loss_ledger.note_cursor() == 0

    # No server to select (the host refuses connections), persistently: the run fails.
    proxy.refuse()
    time.sleep(3 * FAST_FAILURE["heartbeatFrequencyMS"] / 1000)  # the driver's monitor notices
    result = flaky.materialize(key, config=FAULT_BATCHES, raise_on_error=False)
    assert not result.success
    assert "ServerSelectionTimeoutError" in step_message(result)
    assert "Connection refused" in step_message(result)
    assert loss_ledger.note_cursor() == 0

    # MongoDB is back (still slow: two getMores time out): the retry finishes the window and
    # the later steps.
    proxy.restore()
    fail_point.arm(
        {"times": 2}, commands=["getMore"], blockConnection=True, blockTimeMS=3 * SOCKET_TIMEOUT_MS
    )
    cursor, failed = drive(flaky, loss_ledger, tick.cursor, config=FAULT_BATCHES)
    assert not failed
    loss_ledger.apply(history[2])
    cursor, failed = drive(flaky, loss_ledger, cursor)
    assert not failed

    counts = loss_ledger.check()
    counts.assert_clean("6 MongoDB fails mid-extraction")


@pytest.mark.timeout(300)
def test_a_write_back_mongodb_refuses_is_retried_or_leaves_the_versions_unacknowledged(
    pipeline, loss_ledger, mongo, fail_point, tcp_proxy
):
    proxy = tcp_proxy(*mongo.address())
    flaky = through_proxy(pipeline, mongo, proxy)
    history = change_history(hour(1), documents=30, versions=3)
    products = pipeline.db["products"]

    # A retryable write error (shutdown in progress) on the write-back: the driver retries
    # the bulk update itself and the run succeeds.
    loss_ledger.apply(history[0])
    tick = flaky.tick()
    key = tick.run_requests[0].partition_key
    fail_point.arm({"times": 1}, commands=["update"], errorCode=91)
    assert flaky.materialize(key, config=FAULT_BATCHES).success
    assert fail_point_spent(mongo.uri, mongo.database)
    loss_ledger.seen([key])
    assert products.count_documents({"certyo_status": "pending"}) > 0

    # The write-back fails again on the retry: Certyo accepted the versions but MongoDB never
    # recorded it, so the run fails and the sensor's position stays before them.
    loss_ledger.apply(history[1])
    tick = flaky.tick(cursor=tick.cursor)
    key = tick.run_requests[0].partition_key
    before = pipeline.sandbox.stats()["records_stored"]
    fail_point.arm({"times": 2}, commands=["update"], errorCode=11600)
    result = flaky.materialize(key, config=FAULT_BATCHES, raise_on_error=False)
    assert not result.success
    assert "MongoDB failed: NotPrimaryError: " in step_message(result)
    assert pipeline.sandbox.stats()["records_stored"] > before
    assert loss_ledger.note_cursor() == 0

    # The connection is cut while the write-back is in flight and stays cut: the run fails.
    # The cut is made once Certyo has stored the run's first batch, while MongoDB holds the
    # write-back that follows it.
    before = answered(pipeline.sandbox)
    fail_point.arm(
        "alwaysOn", commands=["update"], blockConnection=True, blockTimeMS=SOCKET_TIMEOUT_MS // 2
    )
    watcher = when(lambda: answered(pipeline.sandbox) > before, proxy.cut)
    result = flaky.materialize(key, config=FAULT_BATCHES, raise_on_error=False)
    watcher.join(timeout=30)
    fail_point.off()
    assert watcher.fired
    assert not result.success
    assert re.search(
        r"MongoDB failed: (AutoReconnect|ServerSelectionTimeoutError): ", step_message(result)
    )
    assert loss_ledger.note_cursor() == 0

    proxy.restore()
    cursor, failed = drive(flaky, loss_ledger, tick.cursor, config=FAULT_BATCHES)
    assert not failed
    loss_ledger.apply(history[2])
    cursor, failed = drive(flaky, loss_ledger, cursor, config=FAULT_BATCHES)
    assert not failed

    counts = loss_ledger.check()
    counts.assert_clean("6b MongoDB refuses the write-back")
    assert counts.replays > 0  # what was accepted but never written back came back as replays


@pytest.mark.timeout(300)
def test_a_stalled_network_times_out_the_run_and_the_next_run_ships_everything(
    pipeline, loss_ledger, mongo, tcp_proxy
):
    proxy = tcp_proxy(*mongo.address())
    flaky = through_proxy(pipeline, mongo, proxy)
    history = change_history(hour(1), documents=20, versions=2, poison=0)
    loss_ledger.apply(history[0])
    tick = flaky.tick()
    key = tick.run_requests[0].partition_key

    proxy.stall()  # connections stay open, nothing comes back
    started = time.monotonic()
    result = flaky.materialize(key, config=FAULT_BATCHES, raise_on_error=False)
    elapsed = time.monotonic() - started
    assert not result.success
    assert "NetworkTimeout" in step_message(
        result
    ) or "ServerSelectionTimeoutError" in step_message(result)
    assert elapsed < 60  # the timeouts end the wait, not the test's patience
    assert pipeline.sandbox.stats()["records_stored"] == 0
    assert loss_ledger.note_cursor() == 0

    proxy.restore()
    cursor, failed = drive(flaky, loss_ledger, tick.cursor, config=FAULT_BATCHES)
    assert not failed
    loss_ledger.apply(history[1])
    cursor, failed = drive(flaky, loss_ledger, cursor, config=FAULT_BATCHES)
    assert not failed
    loss_ledger.check().assert_clean("6c stalled network")
