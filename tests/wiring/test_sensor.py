"""The change sensor, its cursor and the `_certyo_cursors` mirror; the hourly schedule."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import dagster as dg
import pymongo
from bson import ObjectId
from fixtures.pipeline import hour, make_pipeline, pk

from certyo_dagster.capture.cursors import decode_position
from certyo_dagster.settings import CollectionSpec


def _doc(ts: datetime, **extra) -> dict:
    return {"_id": ObjectId(), "name": "widget", "updatedAt": ts, **extra}


def _mirror(pipeline) -> dict:
    return pipeline.db["_certyo_cursors"].find_one({"_id": "poll_products"})


def test_no_changes_gives_a_skip_reason(pipeline):
    tick = pipeline.tick()
    assert not tick.run_requests
    assert "no unacknowledged versions" in tick.skip_message


def test_one_run_per_affected_hour_with_stable_run_keys(pipeline):
    products = pipeline.db["products"]
    products.insert_many([_doc(hour(1, 10)), _doc(hour(1, 20)), _doc(hour(3, 5))])

    first = pipeline.tick()

    assert sorted(r.partition_key for r in first.run_requests) == [pk(1), pk(3)]
    assert all(r.tags["certyo/trigger"] == "sensor" for r in first.run_requests)
    # A repeated tick finds the same versions and names the same runs.
    again = pipeline.tick(cursor=first.cursor)
    assert {r.run_key for r in again.run_requests} == {r.run_key for r in first.run_requests}
    # A newer change in hour 1 is a new run for hour 1 only.
    products.insert_one(_doc(hour(1, 40)))
    third = pipeline.tick(cursor=again.cursor)
    new_keys = {r.run_key for r in third.run_requests} - {r.run_key for r in first.run_requests}
    assert len(new_keys) == 1 and new_keys.pop().startswith(pk(1))


def test_cursor_and_mirror_agree_and_advance_only_over_acknowledged_versions(pipeline):
    products = pipeline.db["products"]
    products.insert_many([_doc(hour(2, m)) for m in range(0, 60, 10)])
    products.insert_many([_doc(hour(4, m)) for m in range(0, 60, 15)])

    first = pipeline.tick()
    assert _position(first.cursor) == (hour(2, 0), None)  # nothing acknowledged yet
    assert _mirror(pipeline)["lastSyncAt"] == hour(2, 0)

    assert pipeline.materialize(pk(2)).success
    second = pipeline.tick(cursor=first.cursor)
    last_of_hour_2 = products.find_one({"updatedAt": hour(2, 50)})
    assert _position(second.cursor) == (hour(2, 50), last_of_hour_2["_id"])
    mirror = _mirror(pipeline)
    assert (mirror["lastSyncAt"], mirror["lastId"]) == _position(second.cursor)
    assert [r.partition_key for r in second.run_requests] == [pk(4)]

    assert pipeline.materialize(pk(4)).success
    third = pipeline.tick(cursor=second.cursor)
    assert not third.run_requests
    assert _position(third.cursor)[0] == hour(4, 45)
    assert _mirror(pipeline)["lastSyncAt"] == hour(4, 45)


def _position(cursor: str):
    key = decode_position(cursor)
    return key.ts, key.doc_id


def test_write_back_does_not_retrigger_the_sensor(pipeline):
    pipeline.db["products"].insert_many([_doc(hour(5, m)) for m in range(10)])
    first = pipeline.tick()
    assert first.run_requests
    assert pipeline.materialize(pk(5)).success

    after = pipeline.tick(cursor=first.cursor)

    assert not after.run_requests
    assert after.skip_message


def test_pitfall_client_clock_cursor__a_late_commit_within_the_lookback_is_caught(pipeline):
    products = pipeline.db["products"]
    products.insert_many([_doc(hour(6, m)) for m in range(0, 60, 5)])
    first = pipeline.tick()
    assert pipeline.materialize(pk(6)).success
    caught_up = pipeline.tick(cursor=first.cursor)
    assert _position(caught_up.cursor)[0] == hour(6, 55)

    # A write stamped 3 minutes before the cursor becomes visible only now.
    late = _doc(hour(6, 52))
    products.insert_one(late)
    tick = pipeline.tick(cursor=caught_up.cursor)

    assert [r.partition_key for r in tick.run_requests] == [pk(6)]
    # The position moves back before the late version until it is acknowledged.
    before_late = products.find_one({"updatedAt": hour(6, 50)})
    assert _position(tick.cursor) == (hour(6, 50), before_late["_id"])
    assert pipeline.materialize(pk(6)).success
    assert products.find_one({"_id": late["_id"]})["certyo_status"] == "pending"
    final = pipeline.tick(cursor=tick.cursor)
    assert not final.run_requests
    assert _position(final.cursor)[0] == hour(6, 55)


def test_a_fresh_instance_resumes_from_the_mirror(pipeline, mongo, sandbox):
    pipeline.db["products"].insert_many([_doc(hour(7, m)) for m in range(0, 60, 10)])
    first = pipeline.tick()
    assert pipeline.materialize(pk(7)).success
    second = pipeline.tick(cursor=first.cursor)

    fresh = make_pipeline(mongo, sandbox)  # new Dagster instance, empty sensor cursor
    tick = fresh.tick(cursor=None)

    assert not tick.run_requests
    assert tick.cursor == second.cursor


def test_a_reference_poller_cursor_is_a_handoff_point_and_nothing_before_it_is_resent(
    pipeline,
):
    products = pipeline.db["products"]
    shipped_by_reference = [_doc(hour(8, m)) for m in range(0, 30, 5)]
    products.insert_many(shipped_by_reference)
    # The reference poller's row: only lastSyncAt, from its own clock.
    pipeline.db["_certyo_cursors"].insert_one(
        {"_id": "poll_products", "lastSyncAt": hour(8, 30), "updatedAt": hour(8, 30)}
    )
    newer = _doc(hour(8, 40))
    products.insert_one(newer)

    tick = pipeline.tick(cursor=None)
    assert [r.partition_key for r in tick.run_requests] == [pk(8)]
    assert pipeline.materialize(pk(8)).success

    records = pipeline.certyo_records(collection="products")
    assert [r["recordId"] for r in records] == [str(newer["_id"])]
    assert _mirror(pipeline)["handoffBefore"] == hour(8, 30)


def test_one_mongo_client_per_process_across_runs_and_ticks(pipeline, monkeypatch):
    from certyo_dagster.source.mongo import close_all_clients

    close_all_clients()
    created = []
    real_client = pymongo.MongoClient

    def counting_client(*args, **kwargs):
        created.append(args[0] if args else kwargs.get("host"))
        return real_client(*args, **kwargs)

    monkeypatch.setattr(pymongo, "MongoClient", counting_client)
    pipeline.db["products"].insert_many([_doc(hour(9, m)) for m in range(3)])

    cursor = None
    for _ in range(3):
        cursor = pipeline.tick(cursor=cursor).cursor
        assert pipeline.materialize(pk(9)).success

    assert len(created) == 1


def test_the_hourly_schedule_requests_the_previous_hour(pipeline):
    schedule = pipeline.defs.resolve_schedule_def("ingest_products_hourly")
    assert schedule.cron_schedule == "5 * * * *"
    assert schedule.execution_timezone == "UTC"
    when = datetime(2026, 11, 1, 10, 5, tzinfo=timezone.utc)
    with dg.build_schedule_context(
        scheduled_execution_time=when, repository_def=pipeline.defs.get_repository_def()
    ) as context:
        (request,) = schedule.evaluate_tick(context).run_requests
    assert request.partition_key == pk(9)
    assert request.tags["certyo/trigger"] == "schedule"

    before_start = datetime(2026, 11, 1, 0, 5, tzinfo=timezone.utc)
    with dg.build_schedule_context(
        scheduled_execution_time=before_start,
        repository_def=pipeline.defs.get_repository_def(),
    ) as context:
        data = schedule.evaluate_tick(context)
    assert not data.run_requests and "CERTYO_PARTITION_START" in data.skip_message


def test_two_collections_build_two_independent_sets_of_definitions(mongo, sandbox):
    specs = [
        CollectionSpec(mongo.database, "products"),
        CollectionSpec(mongo.database, "orders", "modifiedAt"),
    ]
    pipeline = make_pipeline(mongo, sandbox, collections=specs)
    defs = pipeline.defs

    for c in ("products", "orders"):
        assert defs.resolve_job_def(f"ingest_{c}")
        assert defs.resolve_schedule_def(f"ingest_{c}_hourly")
        assert defs.resolve_sensor_def(f"{c}_change_sensor")
    graph = defs.resolve_asset_graph()
    orders_receipts = dg.AssetKey([mongo.database, "orders", "ingestion_receipts"])
    assert graph.get(orders_receipts).group_name == "orders"
    upstream = graph.get(dg.AssetKey([mongo.database, "orders", "changed_documents"])).parent_keys
    assert upstream == {dg.AssetKey([mongo.database, "orders"])}

    pipeline.db["orders"].insert_one({"_id": 1, "modifiedAt": hour(3, 1), "total": 5})
    pipeline.db["products"].insert_one(_doc(hour(3, 2)))
    assert pipeline.materialize(pk(3), collection="orders").success
    (record,) = pipeline.certyo_records(collection="orders")
    assert record["recordId"] == "1"
    assert pipeline.certyo_records(collection="products") == []
    assert [r.partition_key for r in pipeline.tick("products").run_requests] == [pk(3)]
    assert not pipeline.tick("orders").run_requests


def test_an_hour_with_a_run_in_progress_is_not_requested_again(pipeline):
    pipeline.db["products"].insert_many([_doc(hour(10, 1)), _doc(hour(11, 1))])
    pipeline.instance.add_run(
        dg.DagsterRun(
            job_name="ingest_products",
            run_id="0a1b2c3d-0000-4000-8000-000000000001",
            status=dg.DagsterRunStatus.STARTED,
            tags={"dagster/partition": pk(10)},
        )
    )

    tick = pipeline.tick()
    assert [r.partition_key for r in tick.run_requests] == [pk(11)]

    pipeline.instance.report_run_failed(
        pipeline.instance.get_run_by_id("0a1b2c3d-0000-4000-8000-000000000001")
    )
    again = pipeline.tick(cursor=tick.cursor)
    assert sorted(r.partition_key for r in again.run_requests) == [pk(10), pk(11)]


def test_an_hour_whose_run_failed_is_requested_again_after_a_pause(pipeline, monkeypatch):
    import certyo_dagster.wiring.sensors as sensors

    pipeline.db["products"].insert_one(_doc(hour(12, 1)))
    first = pipeline.tick()
    (request,) = first.run_requests
    run_id = "0a1b2c3d-0000-4000-8000-000000000002"
    pipeline.instance.add_run(
        dg.DagsterRun(
            job_name="ingest_products",
            run_id=run_id,
            status=dg.DagsterRunStatus.STARTED,
            tags={"dagster/partition": pk(12)},
        )
    )
    pipeline.instance.report_run_failed(pipeline.instance.get_run_by_id(run_id))

    # Right after the failure: the same run key, which Dagster will not launch twice.
    soon = pipeline.tick(cursor=first.cursor)
    assert [r.run_key for r in soon.run_requests] == [request.run_key]
    # Once the pause is over, a new key: the hour is tried again.
    monkeypatch.setattr(sensors, "RETRY_FAILED_HOUR_AFTER", timedelta(0))
    later = pipeline.tick(cursor=first.cursor)
    (retry,) = later.run_requests
    assert retry.partition_key == pk(12) and retry.run_key != request.run_key


def test_hours_inside_a_running_backfill_range_are_not_requested(pipeline):
    pipeline.db["products"].insert_many([_doc(hour(h, 1)) for h in (13, 14, 15)])
    pipeline.instance.add_run(
        dg.DagsterRun(
            job_name="ingest_products",
            run_id="0a1b2c3d-0000-4000-8000-000000000003",
            status=dg.DagsterRunStatus.STARTED,
            tags={
                "dagster/asset_partition_range_start": pk(13),
                "dagster/asset_partition_range_end": pk(14),
            },
        )
    )

    tick = pipeline.tick()

    assert [r.partition_key for r in tick.run_requests] == [pk(15)]
