"""Fault matrix, Certyo side: rate-limit storms, 5xx bursts, dropped connections, read
timeouts, a sandbox restart mid-run, and overlapping runs of one partition.

Each test applies a generated change history step by step, drives the real change sensor
and ingestion job between steps while the sandbox misbehaves over real HTTP, then asks the
loss ledger (tests/fixtures/ledger.py) for 0 lost, 0 duplicates, a cursor that never passed
an unacknowledged version, and a valid inclusion proof for every accepted version.
"""

from __future__ import annotations

import threading
from datetime import datetime, timezone

import dagster as dg
import pytest
from fixtures.ledger import SMALL_BATCHES, LossLedger, change_history, drive, reconfigured
from fixtures.pipeline import hour, make_pipeline, pk

from certyo_dagster.ship.resource import CertyoResource

BULK = "/api/v1/records/bulk"
PASS = {"action": "delay", "seconds": 0, "times": 1, "path": BULK}  # a request that goes through


def _failure_message(result: dg.ExecuteInProcessResult) -> str:
    return result.failure_data_for_node("ingest_products_window").error.message


def _fail_then_retry(pipeline, ledger: LossLedger, cursor, faults: list[dict], expected: str):
    """With `faults` scripted the next run fails naming `expected`; the retry succeeds."""
    pipeline.sandbox.script_faults(faults)
    cursor, failed = drive(pipeline, ledger, cursor)
    assert failed and expected in _failure_message(failed[0])
    assert ledger.note_cursor() == 0
    pipeline.sandbox.clear_faults()
    cursor, failed = drive(pipeline, ledger, cursor)
    assert not failed
    return cursor


def _finish(pipeline, ledger: LossLedger, history, cursor=None, first_step: int = 0):
    """Apply the remaining steps with a healthy sandbox, then drive until nothing is left."""
    for step in history[first_step:]:
        ledger.apply(step)
        cursor, failed = drive(pipeline, ledger, cursor)
        assert not failed, [_failure_message(r) for r in failed]
    cursor, failed = drive(pipeline, ledger, cursor)
    assert not failed
    return cursor


def test_a_429_storm_longer_than_the_retry_budget_fails_the_run_and_the_retry_loses_nothing(
    pipeline, loss_ledger
):
    # Retry-After is honoured but capped at 0.2 s so the storm costs little wall time.
    pipeline = reconfigured(pipeline, max_retry_after_seconds=0.2)
    history = change_history(hour(1))
    sandbox = pipeline.sandbox

    loss_ledger.apply(history[0])
    # One bulk call goes through, then a storm of 429s with Retry-After: more than the two
    # bulk calls in flight can absorb with 3 retries each.
    storm = {"status": 429, "retry_after": 1, "times": 12, "path": BULK}
    cursor = _fail_then_retry(
        pipeline, loss_ledger, None, [{**PASS, "times": 1}, storm], "rate limited after 3 retries"
    )
    loss_ledger.apply(history[1])
    storm = {"status": 429, "times": 12, "path": BULK}  # no Retry-After: our own backoff
    cursor = _fail_then_retry(pipeline, loss_ledger, cursor, [storm], "rate limited")

    _finish(pipeline, loss_ledger, history, cursor, first_step=2)
    assert sandbox.stats()["requests_by_status"]["429"] >= 8
    loss_ledger.check().assert_clean("1 429 storm")


def test_5xx_bursts_and_connections_dropped_after_the_request_are_idempotent_replays(
    pipeline, loss_ledger
):
    history = change_history(hour(1))
    sandbox = pipeline.sandbox

    loss_ledger.apply(history[0])
    # Within the retry budget: a mixed burst on one request, then two responses lost after
    # Certyo stored the records. One bulk call at a time, so the burst hits one request.
    # The run succeeds; the lost responses come back as replays.
    close_after = {"action": "close_after", "times": 1, "path": BULK}
    sandbox.script_faults(
        [
            {"status": 503, "times": 1, "path": BULK},
            {"status": 502, "times": 1, "path": BULK},
            PASS,
            close_after,
            PASS,
            {"status": 500, "times": 1, "path": BULK},
            close_after,
        ]
    )
    cursor, failed = drive(pipeline, loss_ledger, config={**SMALL_BATCHES, "max_in_flight": 1})
    assert not failed
    assert sandbox.stats()["idempotent_replays"] >= 2
    # Beyond the budget: the run fails, the retry re-sends and loses nothing.
    loss_ledger.apply(history[1])
    burst = [close_after, {"status": 503, "times": 12, "path": BULK}]
    cursor = _fail_then_retry(pipeline, loss_ledger, cursor, burst, "failed after 3 retries")

    _finish(pipeline, loss_ledger, history, cursor, first_step=2)
    by_status = sandbox.stats()["requests_by_status"]
    assert by_status["503"] >= 5 and by_status["502"] == 1 and by_status["500"] == 1
    counts = loss_ledger.check()
    counts.assert_clean("2 5xx and close_after")
    assert counts.replays >= 3


def test_read_timeouts_are_retried_as_replays_and_a_timeout_storm_fails_then_recovers(
    pipeline, loss_ledger
):
    # Ordinary bulk calls take well under 2 s even on a loaded 2-core machine; the
    # scripted delays are far beyond it.
    pipeline = reconfigured(pipeline, read_timeout=2.0)
    history = change_history(hour(1))
    sandbox = pipeline.sandbox

    loss_ledger.apply(history[0])
    # Certyo stores the records, then answers after the client gave up waiting.
    sandbox.script_faults([{"action": "delay", "seconds": 4.0, "times": 2, "path": BULK}])
    cursor, failed = drive(pipeline, loss_ledger)
    assert not failed
    assert sandbox.stats()["idempotent_replays"] >= 2

    loss_ledger.apply(history[1])
    slow = [{"action": "delay", "seconds": 4.0, "times": 12, "path": BULK}]
    cursor = _fail_then_retry(pipeline, loss_ledger, cursor, slow, "ReadTimeout")

    _finish(pipeline, loss_ledger, history, cursor, first_step=2)
    counts = loss_ledger.check()
    counts.assert_clean("3 read timeouts")
    assert counts.replays >= 3


_restarts: dict[str, object] = {}


class _RestartingClient:
    """The real client; before its second bulk call of a run the sandbox restarts."""

    def __init__(self, real):
        self._real = real
        self._calls = 0
        self._lock = threading.Lock()

    def ingest_record(self, record):
        return self._real.ingest_record(record)

    def post_bulk_body(self, body, count):
        with self._lock:
            self._calls += 1
            if self._calls == 2 and _restarts.get("left", 0):
                _restarts["left"] -= 1
                server = _restarts["server"]
                server.stop()
                server.start()
                _restarts["port_kept"] = server.base_url == _restarts["base_url"]
        return self._real.post_bulk_body(body, count)


class RestartingCertyoResource(CertyoResource):
    def get_client(self):
        return _RestartingClient(super().get_client())


def test_a_sandbox_restart_in_the_middle_of_a_run_loses_nothing(mongo, sandbox_factory, tmp_path):
    server = sandbox_factory(db_path=str(tmp_path / "certyo.sqlite"))
    pipeline = make_pipeline(mongo, server)
    pipeline = reconfigured(
        pipeline,
        certyo=RestartingCertyoResource(**pipeline.resources["certyo"].model_dump()),
    )
    ledger = LossLedger(pipeline.db, pipeline.spec(), CertyoResource(
        **pipeline.resources["certyo"].model_dump()).get_client(), server)  # fmt: skip
    _restarts.update(left=2, server=server, base_url=server.base_url)
    history = change_history(hour(1))

    restarts_seen = 0
    cursor = None
    for step in history:
        ledger.apply(step)
        cursor, failed = drive(pipeline, ledger, cursor)
        restarts_seen = 2 - _restarts["left"]
        # A run in flight when the sandbox went away either rode it out on retries or failed;
        # either way the next drive finishes the job.
        cursor, failed = drive(pipeline, ledger, cursor)
        assert not failed
    assert restarts_seen == 2 and _restarts["port_kept"]
    stored_before_check = server.stats()["records_stored"]
    counts = ledger.check()
    counts.assert_clean("5 sandbox restart")
    assert stored_before_check == counts.accepted


def test_overlapping_runs_of_one_partition_store_each_version_once(pipeline, loss_ledger):
    history = change_history(hour(1), versions=2)
    for step in history:
        loss_ledger.apply(step)
    tick = pipeline.tick()
    (sensor_request, *_) = [r for r in tick.run_requests if r.partition_key == pk(2)]
    schedule = pipeline.defs.resolve_schedule_def("ingest_products_hourly")
    with dg.build_schedule_context(
        scheduled_execution_time=datetime(2026, 11, 1, 3, 5, tzinfo=timezone.utc),
        repository_def=pipeline.defs.get_repository_def(),
    ) as context:
        (schedule_request,) = schedule.evaluate_tick(context).run_requests
    assert sensor_request.partition_key == schedule_request.partition_key == pk(2)
    # Slow responses keep each run's first bulk calls in flight while the others read the
    # same versions: every version of hour 2 is sent by more than one run.
    pipeline.sandbox.script_faults([{"action": "delay", "seconds": 0.6, "times": 6,
                                     "path": BULK}])  # fmt: skip
    job = pipeline.defs.resolve_job_def("ingest_products")
    run_config = {"ops": {"ingest_products_window": {"config": SMALL_BATCHES}}}
    launches = {
        "sensor": {"partition_key": sensor_request.partition_key, "tags": sensor_request.tags},
        "schedule": {
            "partition_key": schedule_request.partition_key,
            "tags": schedule_request.tags,
        },
        "backfill": {
            "tags": {
                "dagster/asset_partition_range_start": pk(1),
                "dagster/asset_partition_range_end": pk(3),
            }
        },
    }
    barrier = threading.Barrier(len(launches))
    results: dict[str, dg.ExecuteInProcessResult] = {}

    def launch(name: str, kwargs: dict) -> None:
        instance = dg.DagsterInstance.ephemeral()  # each run in its own Dagster process
        barrier.wait()
        results[name] = job.execute_in_process(
            run_config=run_config, instance=instance, raise_on_error=False, **kwargs
        )

    threads = [threading.Thread(target=launch, args=item) for item in launches.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert {name: r.success for name, r in results.items()} == dict.fromkeys(launches, True)
    loss_ledger.seen()
    drive(pipeline, loss_ledger, tick.cursor)

    counts = loss_ledger.check()
    counts.assert_clean("7 overlapping runs")
    assert counts.replays > 0


@pytest.fixture(autouse=True)
def _reset_restarts():
    _restarts.clear()
    yield
    _restarts.clear()
