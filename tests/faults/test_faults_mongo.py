"""Fault matrix, MongoDB side: real faults from the server and the network, mid-run.

The pipeline reaches MongoDB through a loopback TCP proxy (tests/fixtures/tcp_proxy.py) that
can refuse, cut or stall connections, and the server injects its own faults with `failCommand`
fail points aimed at the pipeline's connections only (their appName), so the test's own reads
and writes of the ledger are never hit. The product is unchanged.

The proxied URI carries `heartbeatFrequencyMS=500` so the driver rediscovers the server
half a second after a not-primary error instead of after its 10 s default, and
`socketTimeoutMS` so a blocked command times out.
"""

from __future__ import annotations

import re
import threading
import time
from typing import Any

import pymongo
import pytest
from fixtures.ledger import change_history, drive, reconfigured
from fixtures.pipeline import hour
from pymongo.errors import AutoReconnect
from pymongo.uri_parser import parse_uri

from certyo_dagster.capture.polling import SCAN_RESUMES, partition_key_for
from certyo_dagster.source.mongo import APP_NAME, MongoResource

SOCKET_TIMEOUT_MS = 1000
PROXIED = {
    "heartbeatFrequencyMS": 500,
    "serverSelectionTimeoutMS": 1500,
    "socketTimeoutMS": SOCKET_TIMEOUT_MS,
}
# Small batches, so a window scan is many getMores.
FAULT_BATCHES = {"batch_size": 3, "max_in_flight": 2, "max_payload_bytes": 20_000}


def through_proxy(pipeline: Any, mongo: Any, proxy: Any) -> Any:
    """The same pipeline, its `mongo` resource pointed at `proxy`."""
    options = dict(PROXIED)
    source = parse_uri(mongo.uri)["options"].get("authsource")
    if source:
        options["authSource"] = source
    uri = proxy.uri(mongo.credentials(), **options)
    return reconfigured(pipeline, mongo=MongoResource(uri=uri, database=mongo.database))


def fail_point_spent(mongo: Any) -> bool:
    """Whether a getMore by a client with the pipeline's appName goes through now."""
    with pymongo.MongoClient(mongo.uri, appname=APP_NAME, retryReads=False) as probe:
        try:
            list(probe[mongo.database]["products"].find({}).batch_size(1))
        except AutoReconnect:
            return False
    return True


def message(result) -> str:
    return result.failure_data_for_node("ingest_products_window").error.message


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
    assert fail_point_spent(mongo)
    loss_ledger.seen([key])
    stored = pipeline.sandbox.stats()["records_stored"]

    # Shutdown (91), node recovering (11600), primary stepped down (189): the driver retries
    # the read once the server answers again; on a getMore the scan resumes instead.
    for code in (91, 11600, 189):
        fail_point.arm({"times": 1}, commands=["find"], errorCode=code)
        assert flaky.materialize(key, config=FAULT_BATCHES).success, code
        assert fail_point_spent(mongo)
        fail_point.arm({"times": 2}, commands=["getMore"], errorCode=code)
        assert flaky.materialize(key, config=FAULT_BATCHES).success, code
        assert fail_point_spent(mongo)
    assert pipeline.sandbox.stats()["records_stored"] == stored  # nothing shipped twice

    # One failure more than the scan survives: the run fails and names the cause.
    loss_ledger.apply(history[1])
    tick = flaky.tick(cursor=tick.cursor)
    key = tick.run_requests[0].partition_key
    assert window_size(pipeline, key) > (SCAN_RESUMES + 1) * FAULT_BATCHES["batch_size"]
    fail_point.arm({"times": SCAN_RESUMES + 1}, commands=["getMore"], closeConnection=True)
    result = flaky.materialize(key, config=FAULT_BATCHES, raise_on_error=False)
    assert not result.success
    assert "MongoDB failed: AutoReconnect: " in message(result)
    assert "connection closed" in message(result)
    assert loss_ledger.note_cursor() == 0

    # A refusal the driver must not retry (no privilege): the run fails at once, naming it.
    fail_point.arm({"times": 1}, commands=["find"], errorCode=13)
    result = flaky.materialize(key, config=FAULT_BATCHES, raise_on_error=False)
    assert not result.success
    assert "OperationFailure" in message(result) and "Unauthorized" in message(result)
    assert loss_ledger.note_cursor() == 0

    # Every getMore hangs past the socket timeout: each NetworkTimeout is resumed, until the
    # scan gives up and the run names the timeout.
    fail_point.arm(
        "alwaysOn", commands=["getMore"], blockConnection=True, blockTimeMS=3 * SOCKET_TIMEOUT_MS
    )
    result = flaky.materialize(key, config=FAULT_BATCHES, raise_on_error=False)
    fail_point.off()
    assert not result.success
    assert "MongoDB failed: NetworkTimeout: " in message(result)
    assert loss_ledger.note_cursor() == 0

    # No server to select (the host refuses connections), persistently: the run fails.
    proxy.refuse()
    time.sleep(3 * PROXIED["heartbeatFrequencyMS"] / 1000)  # the driver's monitor notices
    result = flaky.materialize(key, config=FAULT_BATCHES, raise_on_error=False)
    assert not result.success
    assert "ServerSelectionTimeoutError" in message(result)
    assert "Connection refused" in message(result)
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
    assert fail_point_spent(mongo)
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
    assert "MongoDB failed: NotPrimaryError: " in message(result)
    assert pipeline.sandbox.stats()["records_stored"] > before
    assert loss_ledger.note_cursor() == 0

    # The connection is cut while the write-back is in flight and stays cut: the run fails.
    # The cut is made once Certyo has stored the run's first batch, while MongoDB holds the
    # write-back that follows it.
    before = _answered(pipeline.sandbox)
    fail_point.arm(
        "alwaysOn", commands=["update"], blockConnection=True, blockTimeMS=SOCKET_TIMEOUT_MS // 2
    )
    watcher = _when(lambda: _answered(pipeline.sandbox) > before, proxy.cut)
    result = flaky.materialize(key, config=FAULT_BATCHES, raise_on_error=False)
    watcher.join(timeout=30)
    fail_point.off()
    assert watcher.fired
    assert not result.success
    assert re.search(
        r"MongoDB failed: (AutoReconnect|ServerSelectionTimeoutError): ", message(result)
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
    assert "NetworkTimeout" in message(result) or "ServerSelectionTimeoutError" in message(result)
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


def _answered(sandbox: Any) -> int:
    """Records the sandbox stored or answered as replays so far."""
    stats = sandbox.stats()
    return stats["records_stored"] + stats["idempotent_replays"]


class _Watcher(threading.Thread):
    def __init__(self, condition, action, timeout: float):
        super().__init__(daemon=True)
        self.condition, self.action, self.timeout = condition, action, timeout
        self.fired = False

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.condition():
                self.action()
                self.fired = True
                return
            time.sleep(0.02)


def _when(condition, action, timeout: float = 60.0) -> _Watcher:
    """Run `action` in a thread as soon as `condition()` holds."""
    watcher = _Watcher(condition, action, timeout)
    watcher.start()
    return watcher
