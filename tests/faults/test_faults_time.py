"""Fault matrix: clock skew around the sensor's lookback, and taking over from the reference
poller with a fresh Dagster instance."""

from __future__ import annotations

from datetime import datetime, timezone

import dagster as dg
import orjson
from bson import ObjectId
from fixtures.ledger import SMALL_BATCHES, change_history, drive
from fixtures.pipeline import hour, make_pipeline, pk
from fixtures.sandbox import TENANT_A


def _doc(ts: datetime, **extra) -> dict:
    return {"_id": ObjectId(), "name": "widget", "updatedAt": ts, **extra}


def _schedule_request(pipeline, when: datetime) -> dg.RunRequest:
    schedule = pipeline.defs.resolve_schedule_def("ingest_products_hourly")
    with dg.build_schedule_context(
        scheduled_execution_time=when, repository_def=pipeline.defs.get_repository_def()
    ) as context:
        (request,) = schedule.evaluate_tick(context).run_requests
    return request


def test_clock_skew_within_the_lookback_is_caught_by_the_sensor_and_beyond_it_by_schedule_or_backfill(  # noqa: E501
    pipeline, loss_ledger
):
    for minute in range(0, 60, 5):
        loss_ledger.write(_doc(hour(2, minute)))
    cursor, failed = drive(pipeline, loss_ledger)
    assert not failed

    # Written now, stamped 4 minutes before the cursor (inside the 5-minute lookback).
    loss_ledger.write(_doc(hour(2, 51)))
    cursor, failed = drive(pipeline, loss_ledger, cursor)
    assert not failed
    assert loss_ledger.check(verify=False).lost == 0

    # Stamped 35 minutes back: outside the lookback, the sensor cannot see it.
    skewed = loss_ledger.write(_doc(hour(2, 20, 30)))
    tick = pipeline.tick(cursor=cursor)
    assert not tick.run_requests
    assert loss_ledger.note_cursor(record=False) == 1  # the documented limit, made visible
    # The hourly schedule re-reads the whole previous hour.
    request = _schedule_request(pipeline, datetime(2026, 11, 1, 3, 5, tzinfo=timezone.utc))
    assert request.partition_key == pk(2)
    assert pipeline.materialize(request.partition_key, config=SMALL_BATCHES).success
    loss_ledger.seen([pk(2)])
    assert pipeline.db["products"].find_one({"_id": skewed.doc_id})["certyo_status"] == "pending"

    # Stamped hours back: older than the hour the schedule re-reads; a backfill catches it.
    loss_ledger.write(_doc(hour(0, 30)))
    assert not pipeline.tick(cursor=tick.cursor).run_requests
    backfill = pipeline.defs.resolve_job_def("ingest_products").execute_in_process(
        instance=pipeline.instance,
        tags={
            "dagster/asset_partition_range_start": pk(0),
            "dagster/asset_partition_range_end": pk(2),
        },
    )
    assert backfill.success
    loss_ledger.seen([pk(0), pk(1), pk(2)])

    cursor, failed = drive(pipeline, loss_ledger, tick.cursor)
    assert not failed
    loss_ledger.check().assert_clean("9 clock skew")


def test_a_fresh_instance_takes_over_from_the_reference_poller_without_resending(
    pipeline, loss_ledger, mongo, sandbox
):
    history = change_history(hour(1), documents=30, versions=2, late=0, poison=0)
    loss_ledger.apply(history[0])
    # The reference poller shipped the current documents its way (recordVersion "1", a daily
    # idempotency key) and saved only lastSyncAt.
    client = pipeline.resources["certyo"].get_client()
    handoff = hour(1, 40)
    shipped = [
        {
            "database": pipeline.spec().database,
            "collection": "products",
            "recordId": str(doc["_id"]),
            "recordVersion": "1",
            "operationType": "upsert",
            "recordPayload": {"_id": str(doc["_id"]), "sku": doc["sku"]},
            "sourceTimestamp": doc["updatedAt"].isoformat() + "+00:00",
            "idempotencyKey": f"mongo-poll-products-{doc['_id']}-2026-11-01",
        }
        for doc in pipeline.db["products"].find()
    ]
    body = orjson.dumps({"tenantId": TENANT_A, "records": shipped})
    client.post_bulk_body(body, len(shipped))  # one bulk call, as the reference poller makes
    pipeline.db["_certyo_cursors"].insert_one(
        {"_id": "poll_products", "lastSyncAt": handoff, "updatedAt": handoff}
    )
    assert loss_ledger.mark_predecessor(handoff) == len(shipped)
    stored_by_reference = sandbox.stats()["records_stored"]

    fresh = make_pipeline(mongo, sandbox)  # a new Dagster instance, no sensor cursor
    cursor, failed = drive(fresh, loss_ledger, None)
    assert not failed
    assert sandbox.stats()["records_stored"] == stored_by_reference  # nothing re-sent
    loss_ledger.apply(history[1])
    cursor, failed = drive(fresh, loss_ledger, cursor)
    assert not failed

    counts = loss_ledger.check()
    counts.assert_clean("10 reference poller handoff")
    assert counts.accepted == counts.required  # predecessor versions count as accepted
