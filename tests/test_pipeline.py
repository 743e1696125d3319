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
