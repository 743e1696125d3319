"""Verification decisions and the verify engine, without Dagster.

The decisions are pure functions over a document and Certyo's answer; the engine is driven
against MongoDB with small in-process Certyo clients (a sandbox over HTTP where it matters).
"""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import pytest
from bson import ObjectId

from certyo_dagster.prove.hashing import record_hash, record_hash_bytes
from certyo_dagster.prove.merkle import proof_from_levels, tree_levels
from certyo_dagster.sanitize.documents import sanitize_document, version_ms
from certyo_dagster.sanitize.records import record_id_of
from certyo_dagster.settings import CollectionSpec
from certyo_dagster.ship.errors import (
    CertyoAuthError,
    CertyoNotFoundError,
    CertyoUnavailableError,
)
from certyo_dagster.verify.pending import (
    ANCHORED,
    FAILED,
    PENDING,
    PendingVerifier,
    VerifyAbortedError,
    after_id_filter,
    anchoring_summary,
    check_proof,
    decide,
    latency_percentiles,
    precheck,
    write_for,
)

SPEC = CollectionSpec("productdb", "products")
NOW = datetime(2026, 11, 2, 12, 0, tzinfo=timezone.utc)
TS = datetime(2026, 11, 2, 10, 0)


def pending_doc(i: int = 0, ts: datetime = TS, **extra) -> dict:
    """A document as ingestion leaves it: pending, with the hash of its current payload."""
    doc = {"_id": ObjectId(), "sku": f"SKU-{i}", "price": 10 + i, "updatedAt": ts, **extra}
    doc.update(
        certyo_status=PENDING,
        certyo_record_hash=record_hash(sanitize_document(doc)),
        certyo_version=version_ms(ts),
        certyo_ingested_at=(NOW - timedelta(minutes=5)).replace(tzinfo=None),
    )
    return doc


def anchored_response(doc: dict, others: int = 4, index: int = 1) -> dict:
    """A verify answer whose proof really places the document's hash in a small tree."""
    leaves = [bytes([n]) * 32 for n in range(others)]
    leaves.insert(index, record_hash_bytes(doc["certyo_record_hash"]))
    levels = tree_levels(leaves)
    return {
        "verified": True,
        "anchoredOnChain": True,
        "recordId": record_id_of(doc["_id"]),
        "recordHash": doc["certyo_record_hash"],
        "transactionHash": "0x" + "ab" * 32,
        "merkleRoot": levels[-1][0].hex(),
        "merkleProof": {
            "leafIndex": index,
            "treeSize": len(leaves),
            "auditPath": [node.hex() for node in proof_from_levels(index, levels)],
        },
        "ipfsCid": "bafy-test",
        "blockNumber": 123,
        "anchoredAt": (NOW - timedelta(minutes=1)).isoformat(),
        "recordVersion": str(doc["certyo_version"]),
    }


# -- pure decisions -----------------------------------------------------------------------------


def test_anchored_answer_with_a_valid_proof_sets_every_field():
    doc = pending_doc()
    outcome = decide(doc, anchored_response(doc), now=NOW)
    assert outcome.kind == ANCHORED
    assert outcome.fields["certyo_status"] == "anchored"
    assert outcome.fields["certyo_record_hash"] == doc["certyo_record_hash"]
    assert outcome.fields["certyo_tx_hash"] == "0x" + "ab" * 32
    assert outcome.fields["certyo_block_number"] == 123
    assert outcome.fields["certyo_ipfs_cid"] == "bafy-test"
    assert outcome.fields["certyo_merkle_root"] == anchored_response(doc)["merkleRoot"]
    assert outcome.fields["certyo_verified_at"].tzinfo is None  # naive UTC, like pymongo
    assert outcome.latency_seconds == pytest.approx(240.0)


def test_answer_without_proof_or_optional_fields_is_still_anchored():
    doc = pending_doc()
    response = anchored_response(doc)
    for key in ("merkleProof", "merkleRoot", "ipfsCid", "blockNumber"):
        response[key] = None
    outcome = decide(doc, response, now=NOW)
    assert outcome.kind == ANCHORED
    assert set(outcome.fields) == {
        "certyo_status",
        "certyo_record_hash",
        "certyo_verified_at",
        "certyo_tx_hash",
    }


@pytest.mark.parametrize("index", [0, 1, 4])
def test_proof_checks_pass_for_any_leaf_position(index):
    doc = pending_doc()
    response = anchored_response(doc, others=4, index=index)
    assert check_proof(response, doc["certyo_record_hash"]) is None


def test_a_flipped_byte_in_the_audit_path_fails_the_proof():
    doc = pending_doc()
    response = anchored_response(doc)
    path = response["merkleProof"]["auditPath"]
    path[0] = ("ff" if path[0][:2] != "ff" else "00") + path[0][2:]
    outcome = decide(doc, response, now=NOW)
    assert outcome.kind == FAILED
    assert outcome.reason_code == "proof_mismatch"


def test_a_different_root_fails_the_proof():
    doc = pending_doc()
    response = anchored_response(doc)
    response["merkleRoot"] = "00" * 32
    assert decide(doc, response, now=NOW).reason_code == "proof_mismatch"


def test_a_malformed_proof_is_named_invalid():
    doc = pending_doc()
    response = anchored_response(doc)
    response["merkleProof"]["auditPath"] = ["not hex"]
    outcome = decide(doc, response, now=NOW)
    assert outcome.kind == FAILED
    assert outcome.reason_code == "invalid_proof"


def test_certyo_answering_for_another_hash_is_never_anchored():
    doc = pending_doc()
    response = anchored_response(doc)
    response["recordHash"] = "sha256:" + "0" * 64
    outcome = decide(doc, response, now=NOW)
    assert outcome.kind == FAILED
    assert outcome.reason_code == "certyo_hash_mismatch"


def test_not_anchored_yet_stays_pending_until_the_deadline():
    doc = pending_doc()
    response = {**anchored_response(doc), "anchoredOnChain": False, "transactionHash": None}
    assert decide(doc, response, now=NOW).kind == PENDING
    doc["certyo_ingested_at"] = (NOW - timedelta(hours=25)).replace(tzinfo=None)
    outcome = decide(doc, response, now=NOW, deadline=timedelta(hours=24))
    assert outcome.kind == FAILED
    assert outcome.reason_code == "not_anchored_in_time"
    assert decide(doc, response, now=NOW, deadline=timedelta(hours=48)).kind == PENDING


def test_precheck_leaves_a_document_edited_since_ingestion_for_re_ingestion():
    doc = pending_doc()
    doc["updatedAt"] = TS + timedelta(minutes=1)
    doc["price"] = 99
    assert precheck(doc, SPEC).kind == "stale"


def test_precheck_fails_a_payload_changed_without_a_timestamp_bump():
    doc = pending_doc()
    doc["price"] = 99
    outcome = precheck(doc, SPEC)
    assert outcome.kind == FAILED
    assert outcome.reason_code == "payload_changed"
    assert "updatedAt" in outcome.reason


def test_precheck_passes_an_intact_document_and_ignores_certyo_fields():
    doc = pending_doc()
    doc["certyo_failure_reason"] = "left over"
    assert precheck(doc, SPEC) is None


def test_precheck_fails_a_pending_document_without_a_hash():
    doc = pending_doc()
    del doc["certyo_record_hash"]
    assert precheck(doc, SPEC).reason_code == "missing_record_hash"


def test_write_back_is_pinned_to_the_verified_version_and_never_touches_the_timestamp():
    doc = pending_doc()
    update = write_for(doc, decide(doc, anchored_response(doc), now=NOW), SPEC)
    assert update._filter == {
        "_id": doc["_id"],
        "certyo_status": "pending",
        "certyo_version": doc["certyo_version"],
        "certyo_record_hash": doc["certyo_record_hash"],
        "updatedAt": TS,
    }
    assert "updatedAt" not in update._doc["$set"]
    assert write_for(doc, precheck({**doc, "updatedAt": TS + timedelta(1)}, SPEC), SPEC) is None


def test_latency_percentiles():
    assert latency_percentiles([]) == {"p50": None, "p95": None}
    values = [float(n) for n in range(1, 101)]
    result = latency_percentiles(values)
    assert result["p50"] == pytest.approx(50.5)
    assert result["p95"] == pytest.approx(95.05)


# -- the engine against MongoDB ----------------------------------------------------------------


class FakeCertyo:
    """Answers from a dict of responses by recordId; counts calls."""

    def __init__(self, responses: dict, on_call=None):
        self.responses = responses
        self.calls: list[tuple] = []
        self.on_call = on_call
        self._lock = threading.Lock()

    def verify_record(self, database, collection, record_id, record_hash=None):
        with self._lock:
            self.calls.append((database, collection, record_id, record_hash))
        if self.on_call:
            self.on_call(record_id)
        answer = self.responses.get(record_id)
        if isinstance(answer, Exception):
            raise answer
        if answer is None:
            raise CertyoNotFoundError("POST /api/v1/verify/record found nothing: HTTP 404")
        return answer


@pytest.fixture
def products(mongo):
    return mongo.db()["products"]


def _spec(products) -> CollectionSpec:
    return CollectionSpec(products.database.name, products.name)


def _verifier(products, client, **kwargs) -> PendingVerifier:
    return PendingVerifier(
        collection=products, spec=_spec(products), client=client, clock=lambda: NOW, **kwargs
    )


def test_only_pending_documents_are_selected(products):
    docs = [pending_doc(i) for i in range(3)]
    never_ingested = {"_id": ObjectId(), "sku": "x", "updatedAt": TS}
    anchored = {**pending_doc(9), "certyo_status": "anchored"}
    products.insert_many([*docs, never_ingested, anchored])
    client = FakeCertyo({record_id_of(d["_id"]): anchored_response(d) for d in docs})

    report = _verifier(products, client).run()

    assert sorted(c[2] for c in client.calls) == sorted(record_id_of(d["_id"]) for d in docs)
    assert report.anchored == 3
    assert "certyo_status" not in products.find_one({"_id": never_ingested["_id"]})


def test_verify_calls_carry_the_ingested_hash(products):
    doc = pending_doc()
    products.insert_one(doc)
    client = FakeCertyo({record_id_of(doc["_id"]): anchored_response(doc)})
    _verifier(products, client).run()
    assert client.calls == [
        (products.database.name, "products", record_id_of(doc["_id"]), doc["certyo_record_hash"])
    ]


def test_an_edit_racing_the_verify_call_is_not_marked_anchored(products):
    doc = pending_doc()
    products.insert_one(doc)

    def edit_meanwhile(_record_id):
        products.update_one(
            {"_id": doc["_id"]}, {"$set": {"price": 1, "updatedAt": TS + timedelta(seconds=1)}}
        )

    client = FakeCertyo({record_id_of(doc["_id"]): anchored_response(doc)}, edit_meanwhile)
    report = _verifier(products, client).run()

    stored = products.find_one({"_id": doc["_id"]})
    assert stored["certyo_status"] == "pending"
    assert "certyo_tx_hash" not in stored
    assert report.anchored == 0
    assert report.lost_races == 1


def test_pages_cover_every_pending_document_across_id_types(products):
    docs = [pending_doc(i) for i in range(7)]
    for i, doc in enumerate(docs[:3]):
        doc["_id"] = [f"str-{i}", i, 1000 + i][i]
    for doc in docs:
        doc["certyo_record_hash"] = record_hash(sanitize_document(doc))
    products.insert_many(docs)
    client = FakeCertyo({record_id_of(d["_id"]): anchored_response(d) for d in docs})

    report = _verifier(products, client, page_size=2).run()

    assert report.selected == 7
    assert report.anchored == 7
    assert products.count_documents({"certyo_status": "anchored"}) == 7


def test_a_run_stops_at_max_documents(products):
    docs = [pending_doc(i) for i in range(25)]
    products.insert_many(docs)
    pending_answer = {
        record_id_of(d["_id"]): {
            **anchored_response(d),
            "anchoredOnChain": False,
            "transactionHash": None,
        }
        for d in docs
    }
    client = FakeCertyo(pending_answer)

    report = _verifier(products, client, max_documents=10, page_size=4).run()

    assert len(client.calls) == 10
    assert report.still_pending == 10
    assert report.reached_max_documents


def test_unavailable_certyo_leaves_documents_pending_and_stops_the_run(products):
    docs = [pending_doc(i) for i in range(6)]
    products.insert_many(docs)
    down = CertyoUnavailableError("POST /api/v1/verify/record failed after 3 retries: HTTP 503")
    client = FakeCertyo({record_id_of(d["_id"]): down for d in docs})

    with pytest.raises(VerifyAbortedError, match="stopped after 2 failed verify calls") as info:
        _verifier(products, client, max_errors=2, page_size=2).run()

    assert info.value.report.errors == 2
    assert len(client.calls) == 2
    assert products.count_documents({"certyo_status": "pending"}) == 6


def test_a_refused_api_key_aborts(products):
    doc = pending_doc()
    products.insert_one(doc)
    refused = CertyoAuthError("POST /api/v1/verify/record was refused: HTTP 401")
    client = FakeCertyo({record_id_of(doc["_id"]): refused})
    with pytest.raises(VerifyAbortedError, match="refused the API key"):
        _verifier(products, client).run()
    assert products.find_one()["certyo_status"] == "pending"


def test_summary_counts_every_status(products):
    products.insert_many([pending_doc(i) for i in range(3)])
    products.insert_many([{**pending_doc(i), "certyo_status": "anchored"} for i in range(4)])
    products.insert_many(
        [
            {**pending_doc(i), "certyo_status": "failed", "certyo_failure_reason": reason}
            for i, reason in enumerate(["proof_mismatch: x", "unknown_to_certyo: y"])
        ]
    )
    products.insert_one({"_id": ObjectId(), "updatedAt": TS})
    summary = anchoring_summary(products)
    assert summary.total == 10
    assert summary.by_status == {
        "pending": 3,
        "anchored": 4,
        "failed": 2,
        "rejected": 0,
        "not ingested": 1,
    }
    assert summary.failure_reasons == {"proof_mismatch": 1, "unknown_to_certyo": 1}
    assert summary.integrity_failures == 1
    assert summary.oldest_pending_ingested_at == (NOW - timedelta(minutes=5)).replace(tzinfo=None)


def test_paging_after_an_id_never_returns_to_earlier_types(products):
    ids = [None, -3, 2.5, "", "b", {"k": 1}, ObjectId(), False, True, datetime(2020, 1, 1)]
    products.insert_many([{"_id": i} for i in ids])
    ordered = [d["_id"] for d in products.find(sort=[("_id", 1)])]
    for position, last in enumerate(ordered):
        after = [d["_id"] for d in products.find(after_id_filter(last), sort=[("_id", 1)])]
        assert after == ordered[position + 1 :], f"after {last!r}"
