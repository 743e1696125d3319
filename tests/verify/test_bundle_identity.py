"""The verifier restates how a recordId follows from `_id` (it may not import the pipeline);
for `_id`s of every BSON type, its rule and the pipeline's record mapping agree."""

from __future__ import annotations

import uuid
from datetime import datetime

import pytest
from bson import Binary, Decimal128, Int64, ObjectId

from certyo_dagster.prove.bundle import build_bundle, encode_bundle
from certyo_dagster.prove.hashing import record_hash, record_hash_bytes
from certyo_dagster.prove.merkle import merkle_root
from certyo_dagster.prove.verifier import record_id_for, verify_bundle_bytes
from certyo_dagster.sanitize.documents import sanitize_document, version_ms
from certyo_dagster.sanitize.records import record_id_of
from certyo_dagster.settings import CollectionSpec

IDS = [
    "plain",
    "ünïcødé/with spaces",
    ObjectId("665a1b2c3d4e5f6a7b8c9d0e"),
    7,
    -3,
    Int64(2**62),
    2**60,
    1.5,
    2.0,
    True,
    Decimal128("1.10"),
    uuid.UUID("12345678-1234-5678-1234-567812345678"),
    Binary(b"\x00\x01raw", 0),
    datetime(2026, 1, 2, 3, 4, 5, 678000),
    {"tenant": "a", "n": 1},
    ["compound", 1],
]


@pytest.mark.parametrize("doc_id", IDS, ids=lambda v: type(v).__name__)
def test_the_verifier_derives_the_pipelines_record_id(doc_id):
    spec = CollectionSpec("productdb", "products", "meta.changedAt")
    ts = datetime(2026, 11, 30, 9, 15, 42, 123000)
    doc = {"_id": doc_id, "name": "x", "meta": {"changedAt": ts}}
    payload = sanitize_document(doc)
    digest = record_hash(payload)
    assert record_id_for(payload["_id"]) == record_id_of(doc_id)
    bundle = build_bundle(
        database=spec.database,
        collection=spec.collection,
        document_id=payload["_id"],
        record_id=record_id_of(doc_id),
        version=version_ms(ts),
        timestamp_field=spec.timestamp_field,
        payload=payload,
        record_hash=digest,
        leaf_index=0,
        tree_size=1,
        audit_path=[],
        root=merkle_root([record_hash_bytes(digest)]).hex(),
        chain_id=None,
        transaction_hash="0x" + "ab" * 32,
        block_number=1,
        ipfs_cid=None,
        ingested_at="2026-11-30T09:16:00.000Z",
        anchored_at="2026-11-30T09:17:00.000Z",
    )
    verdict = verify_bundle_bytes(encode_bundle(bundle))
    assert verdict.ok, verdict.line()
