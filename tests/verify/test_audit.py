"""The tamper audit engine against MongoDB: exactly the documents changed behind the
pipeline's back are reported, and nothing else."""

from __future__ import annotations

from datetime import timedelta

from bson import ObjectId
from test_verify import TS, pending_doc

from certyo_dagster.prove.hashing import record_hash
from certyo_dagster.sanitize.documents import sanitize_document
from certyo_dagster.sanitize.records import record_id_of
from certyo_dagster.settings import CollectionSpec
from certyo_dagster.verify.audit import NEW_VERSION, TAMPERED, audit_document, run_tamper_audit

SPEC = CollectionSpec("productdb", "products")


def anchored_doc(i: int) -> dict:
    return {**pending_doc(i), "certyo_status": "anchored", "certyo_tx_hash": "0x01"}


def test_intact_tampered_and_newly_edited_documents_are_told_apart():
    doc = anchored_doc(1)
    assert audit_document(doc, SPEC) is None
    assert audit_document({**doc, "price": 1}, SPEC) == TAMPERED
    edited = {**doc, "price": 1, "updatedAt": TS + timedelta(seconds=1)}
    assert audit_document(edited, SPEC) == NEW_VERSION


def test_the_audit_reports_exactly_the_tampered_documents_in_batches(mongo):
    products = mongo.db()["products"]
    docs = [anchored_doc(i) for i in range(23)]
    tampered = {docs[3]["_id"], docs[17]["_id"]}
    for doc in docs:
        if doc["_id"] in tampered:
            doc["price"] = -1  # changed in place, timestamp untouched
    docs[5]["updatedAt"] = TS + timedelta(minutes=1)  # a normal edit awaiting re-ingestion
    docs[5]["price"] = 77
    reingested = pending_doc(99)  # edited and re-ingested: pending with its new hash
    reingested["price"] = 5
    reingested["certyo_record_hash"] = record_hash(sanitize_document(reingested))
    never_ingested = {"_id": ObjectId(), "sku": "new", "updatedAt": TS}
    products.insert_many([*docs, reingested, never_ingested])

    report = run_tamper_audit(
        products, CollectionSpec(mongo.database, "products"), batch_size=4, max_listed=10
    )

    assert report.audited == 23
    assert report.tampered == 2
    assert report.awaiting_reingestion == 1
    assert sorted(report.tampered_ids) == sorted(record_id_of(i) for i in tampered)


def test_the_listed_ids_are_bounded_but_the_count_is_not(mongo):
    products = mongo.db()["products"]
    docs = [{**anchored_doc(i), "price": -1} for i in range(7)]
    products.insert_many(docs)
    report = run_tamper_audit(
        products, CollectionSpec(mongo.database, "products"), batch_size=3, max_listed=2
    )
    assert report.mismatches == 7
    assert len(report.tampered_ids) == 2
