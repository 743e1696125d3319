"""The polling pipeline end to end: mongomock → Dagster job → Certyo sandbox over HTTP.

Each defect of the reference poller (shared/reference/pitfalls.md, "Polling worker") has a
test named after it.
"""

from __future__ import annotations

from datetime import datetime

from bson import Decimal128, ObjectId
from fixtures.pipeline import hour, pk


def _product(i: int, ts: datetime, **extra) -> dict:
    return {"_id": ObjectId(), "sku": f"SKU-{i:06d}", "price": Decimal128("9.90"), "updatedAt": ts,
            **extra}  # fmt: skip


def test_one_partition_ships_every_version_and_writes_back_pending(pipeline):
    products = pipeline.db["products"]
    products.insert_many([_product(i, hour(2, minute=i % 60)) for i in range(25)])
    products.insert_one(_product(99, hour(3)))  # the next hour: not in this partition

    result = pipeline.materialize(pk(2))

    assert result.success
    records = pipeline.certyo_records(collection="products")
    assert len(records) == 25
    for doc in products.find({"updatedAt": {"$lt": hour(3)}}):
        assert doc["certyo_status"] == "pending"
        assert doc["certyo_record_hash"].startswith("sha256:")
        assert doc["certyo_version"] == int(
            (doc["updatedAt"] - datetime(1970, 1, 1)).total_seconds() * 1000
        )
    assert "certyo_status" not in products.find_one({"updatedAt": hour(3)})
    receipts = result.asset_materializations_for_node("ingest_products_window")
    by_key = {m.asset_key.to_user_string(): m.metadata for m in receipts}
    assert by_key["productdb/products/ingestion_receipts"]["accepted"].value == 25
    assert by_key["productdb/products/changed_documents"]["extracted"].value == 25


def _records_by_id(pipeline) -> dict[str, list[dict]]:
    by_id: dict[str, list[dict]] = {}
    for record in pipeline.certyo_records(collection="products"):
        by_id.setdefault(record["recordId"], []).append(record)
    return by_id


def test_pitfall_limit_5000_then_save_now__12000_changes_in_one_hour_all_arrive(pipeline):
    products = pipeline.db["products"]
    products.insert_many(
        [_product(i, hour(4, minute=i % 60, second=i % 59, ms=i % 1000)) for i in range(12_000)]
    )

    result = pipeline.materialize(pk(4))

    assert result.success
    by_id = _records_by_id(pipeline)
    assert len(by_id) == 12_000
    assert all(len(versions) == 1 for versions in by_id.values())
    assert products.count_documents({"certyo_status": "pending"}) == 12_000
    stats = pipeline.sandbox.stats()
    assert stats["records_stored"] == 12_000


def test_pitfall_sort_on_updated_at_alone__3000_ties_across_batches_arrive_exactly_once(pipeline):
    products = pipeline.db["products"]
    tie = hour(5, minute=30)
    products.insert_many([_product(i, tie) for i in range(3_000)])
    # Ties with other _id types sort after ObjectIds ($gt alone would miss them).
    products.insert_many([{"_id": f"str-{i}", "updatedAt": tie} for i in range(5)])
    products.insert_many([{"_id": i, "updatedAt": tie} for i in range(5)])

    result = pipeline.materialize(pk(5), config={"batch_size": 333})

    assert result.success
    by_id = _records_by_id(pipeline)
    assert len(by_id) == 3_010
    assert sorted(len(v) for v in by_id.values()) == [1] * 3_010


def test_pitfall_daily_idempotency_key__two_updates_on_one_day_are_two_versions(pipeline):
    products = pipeline.db["products"]
    doc = _product(1, hour(6, minute=1))
    products.insert_one(doc)
    assert pipeline.materialize(pk(6)).success
    products.update_one(
        {"_id": doc["_id"]}, {"$set": {"price": Decimal128("12.50"), "updatedAt": hour(6, 40)}}
    )
    assert pipeline.materialize(pk(6)).success

    versions = _records_by_id(pipeline)[str(doc["_id"])]
    assert [v["recordVersion"] for v in versions] == [
        str(int((hour(6, 1) - datetime(1970, 1, 1)).total_seconds() * 1000)),
        str(int((hour(6, 40) - datetime(1970, 1, 1)).total_seconds() * 1000)),
    ]
    assert len({v["idempotencyKey"] for v in versions}) == 2
    assert versions[1]["recordPayload"]["price"] == "12.50"


def test_pitfall_naive_datetimes__every_timestamp_sent_carries_an_offset(pipeline):
    pipeline.db["products"].insert_one(
        _product(1, hour(7, 15, 30, 250), launchedAt=datetime(2020, 5, 17, 8, 30))
    )
    assert pipeline.materialize(pk(7)).success

    (record,) = pipeline.certyo_records(collection="products")
    assert record["sourceTimestamp"] == "2026-11-01T07:15:30.250+00:00"
    assert record["recordPayload"]["updatedAt"] == "2026-11-01T07:15:30.250+00:00"
    assert record["recordPayload"]["launchedAt"] == "2020-05-17T08:30:00.000+00:00"


def test_certyo_fields_are_not_part_of_the_payload_and_write_back_keeps_the_timestamp(pipeline):
    products = pipeline.db["products"]
    doc = _product(1, hour(8, 5), certyo_status="anchored", certyo_note="stale")
    products.insert_one(doc)
    assert pipeline.materialize(pk(8)).success

    (record,) = pipeline.certyo_records(collection="products")
    assert not [k for k in record["recordPayload"] if k.startswith("certyo_")]
    stored = products.find_one({"_id": doc["_id"]})
    assert stored["updatedAt"] == hour(8, 5)
    assert stored["certyo_status"] == "pending"


def test_rerun_sends_nothing_new_and_force_gives_only_replays(pipeline):
    products = pipeline.db["products"]
    products.insert_many([_product(i, hour(9, i)) for i in range(30)])
    assert pipeline.materialize(pk(9)).success
    before = pipeline.sandbox.stats()

    rerun = pipeline.materialize(pk(9))
    meta = _metadata(rerun, "ingestion_receipts")
    assert meta["sent"] == 0 and meta["skipped_already_acknowledged"] == 30
    assert pipeline.sandbox.stats()["records_stored"] == before["records_stored"] == 30

    forced = pipeline.materialize(pk(9), config={"force": True})
    meta = _metadata(forced, "ingestion_receipts")
    assert meta["sent"] == 30 and meta["replayed"] == 30 and meta["accepted"] == 0
    after = pipeline.sandbox.stats()
    assert after["records_stored"] == 30
    assert after["idempotent_replays"] == before["idempotent_replays"] + 30


def _metadata(result, asset: str) -> dict:
    for m in result.asset_materializations_for_node("ingest_products_window"):
        if m.asset_key.path[-1] == asset:
            return {k: getattr(v, "value", v) for k, v in m.metadata.items()}
    raise AssertionError(f"no materialization of {asset}")


def _check(result, name: str):
    (evaluation,) = [e for e in result.get_asset_check_evaluations() if e.check_name == name]
    return evaluation
