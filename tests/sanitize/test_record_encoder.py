"""CertyoRecordEncoder must send exactly the bytes of `orjson.dumps(to_certyo_record(...))`.

The ingest path encodes each record once through the encoder; the record hash Certyo
computes, and the idempotency keys, must not depend on which of the two built the record.
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone

import orjson
import pytest
from bson import ObjectId

from certyo_dagster.sanitize.documents import PoisonDocumentError
from certyo_dagster.sanitize.records import CertyoRecordEncoder, to_certyo_record
from certyo_dagster.settings import CollectionSpec
from certyo_demo.catalog import product
from tests.sanitize.test_sanitize import zoo_document

SPEC = CollectionSpec("productdb", "products")
TENANT = 'acme "corp" ✓'
NAIVE = datetime(2026, 1, 2, 3, 4, 5, 678000)


def _same(doc: dict, spec: CollectionSpec = SPEC, tenant: str = TENANT) -> None:
    encoded = CertyoRecordEncoder(spec, tenant).encode(doc)
    record = to_certyo_record(doc, spec, tenant)
    assert encoded.json == orjson.dumps(record)
    assert encoded.as_record() == record
    assert encoded.record_id == record["recordId"]
    assert str(encoded.version) == record["recordVersion"]
    assert encoded.source_timestamp == record["sourceTimestamp"]


def test_every_bson_type_encodes_to_the_same_bytes() -> None:
    _same(zoo_document())


def test_catalog_products_encode_to_the_same_bytes() -> None:
    rng = random.Random(3)
    for i in range(200):
        _same(product(rng, i, NAIVE + timedelta(seconds=i)))


@pytest.mark.parametrize(
    "doc_id",
    ["plain", 'Grüße "quoted" \\ ✓', "x" * 400, 42, ObjectId(), {"k": 1}, -(2**60)],
)
def test_record_ids_needing_escapes_or_hashed_keys_encode_the_same(doc_id) -> None:
    _same({"_id": doc_id, "updatedAt": NAIVE, "v": 1})


def test_aware_and_dotted_timestamps_encode_the_same() -> None:
    aware = datetime(2026, 1, 2, 4, 34, 5, 678000, tzinfo=timezone(timedelta(hours=1)))
    _same({"_id": 1, "updatedAt": aware})
    _same({"_id": 1, "meta": {"ts": NAIVE}}, CollectionSpec("db", "c", "meta.ts"))


@pytest.mark.parametrize(
    ("doc", "reason", "max_bytes"),
    [
        ({"updatedAt": NAIVE}, "missing_id", 1000),
        ({"_id": 1}, "missing_timestamp", 1000),
        ({"_id": 1, "updatedAt": "yesterday"}, "bad_timestamp", 1000),
        ({"_id": 1, "updatedAt": NAIVE, "bad": object()}, "unsupported_type", 1000),
        ({"_id": 1, "updatedAt": NAIVE, "big": "x" * 2000}, "too_large", 1000),
    ],
)
def test_poison_documents_fail_the_same_way(doc, reason, max_bytes) -> None:
    with pytest.raises(PoisonDocumentError) as from_encoder:
        CertyoRecordEncoder(SPEC, TENANT, max_payload_bytes=max_bytes).encode(doc)
    with pytest.raises(PoisonDocumentError) as from_record:
        to_certyo_record(doc, SPEC, TENANT, max_payload_bytes=max_bytes)
    assert from_encoder.value.reason == from_record.value.reason == reason
    assert str(from_encoder.value) == str(from_record.value)
