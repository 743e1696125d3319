"""The write-back builders, applied to a MongoDB collection: what lands, and what must not."""

from __future__ import annotations

from datetime import datetime

import pytest
from pymongo.errors import BulkWriteError, PyMongoError

from certyo_dagster.fields import DEAD_LETTERS_COLLECTION
from certyo_dagster.settings import CollectionSpec
from certyo_dagster.ship.writeback import (
    dead_letter_upsert,
    pending_update,
    rejected_update,
    resolve_letters,
    unchanged_by_replay,
)
from certyo_dagster.source.mongo import bulk_update, bulk_upsert

SPEC = CollectionSpec("productdb", "products")
TS = datetime(2026, 11, 1, 9, 30)
LATER = datetime(2026, 11, 1, 9, 45)
NOW = datetime(2026, 11, 1, 10, 0)
VERSION = 1_793_532_600_000
HASH = "sha256:" + "ab" * 32


@pytest.fixture
def db(mongo):
    return mongo.db()


def _anchored(**extra) -> dict:
    return {
        "_id": "p1",
        "updatedAt": TS,
        "name": "kettle",
        "certyo_status": "anchored",
        "certyo_version": VERSION,
        "certyo_record_hash": HASH,
        "certyo_tx_hash": "0x" + "11" * 32,
        "certyo_merkle_root": "cd" * 32,
        "certyo_block_number": 7,
        "certyo_ipfs_cid": "bafy",
        "certyo_verified_at": NOW,
        "certyo_failure_reason": "old",
        **extra,
    }


def test_pending_marks_the_shipped_version_and_drops_the_previous_proof(db):
    products = db["products"]
    products.insert_one(_anchored())
    new_hash = "sha256:" + "ef" * 32
    update = pending_update(SPEC, "p1", TS, version=VERSION, record_hash=new_hash, ingested_at=NOW)

    assert bulk_update(products, [update], "write-back").modified_count == 1
    stored = products.find_one({"_id": "p1"})
    assert stored == {
        "_id": "p1",
        "updatedAt": TS,
        "name": "kettle",
        "certyo_status": "pending",
        "certyo_version": VERSION,
        "certyo_record_hash": new_hash,
        "certyo_ingested_at": NOW,
    }


def test_pending_never_labels_a_newer_edit_with_the_shipped_versions_hash(db):
    products = db["products"]
    products.insert_one({"_id": "p1", "updatedAt": LATER, "name": "edited meanwhile"})
    update = pending_update(SPEC, "p1", TS, version=VERSION, record_hash=HASH, ingested_at=NOW)

    assert bulk_update(products, [update], "write-back").matched_count == 0
    assert "certyo_status" not in products.find_one({"_id": "p1"})


def test_a_dotted_timestamp_field_pins_the_version_too(db):
    spec = CollectionSpec("productdb", "orders", "meta.modifiedAt")
    orders = db["orders"]
    orders.insert_one({"_id": 1, "meta": {"modifiedAt": TS}})
    update = pending_update(spec, 1, TS, version=VERSION, record_hash=HASH, ingested_at=NOW)
    assert update._filter == {"_id": 1, "meta.modifiedAt": TS}
    bulk_update(orders, [update], "write-back")
    assert orders.find_one({"_id": 1})["certyo_status"] == "pending"


def test_a_replay_of_the_anchored_version_with_the_same_hash_changes_nothing():
    doc = _anchored()
    assert unchanged_by_replay(doc, VERSION, HASH)
    assert not unchanged_by_replay(doc, VERSION + 1, HASH)
    assert not unchanged_by_replay(doc, VERSION, "sha256:" + "00" * 32)
    assert not unchanged_by_replay({**doc, "certyo_status": "pending"}, VERSION, HASH)


def test_a_dead_letter_is_filed_once_per_version_and_counts_its_attempts(db):
    letters = db[DEAD_LETTERS_COLLECTION]

    def letter(message: str, when: datetime, version: int | None = VERSION):
        return dead_letter_upsert(
            SPEC, "p1", TS, version=version, reason="too_large", message=message,
            stage="sanitize", run_id="run-1", partition_key="2026-11-01-09:00", now=when,
        )  # fmt: skip

    bulk_upsert(letters, [letter("x" * 5000, NOW)], "dead letters")
    bulk_upsert(letters, [letter("second try", LATER)], "dead letters")
    bulk_upsert(letters, [letter("no date", NOW, version=None)], "dead letters")

    stored = letters.find_one({"_id": f"productdb.products:p1:{VERSION}"})
    assert stored["attempts"] == 2
    assert (stored["firstSeenAt"], stored["lastSeenAt"]) == (NOW, LATER)
    assert stored["message"] == "second try"
    assert stored["resolvedAt"] is None
    assert (stored["documentId"], stored["recordId"], stored["version"]) == ("p1", "p1", VERSION)
    assert (stored["stage"], stored["runId"]) == ("sanitize", "run-1")
    assert stored["reason"] == "too_large"
    assert letters.find_one({"_id": "productdb.products:p1:None"})["attempts"] == 1
    long = dead_letter_upsert(
        SPEC, "p1", "not a date", version=None, reason="r", message="x" * 5000,
        stage="ingest", run_id="r", partition_key=None, now=NOW,
    )  # fmt: skip
    assert len(long._doc["$set"]["message"]) == 2000
    assert long._doc["$set"]["timestamp"] is None


def test_a_rejected_version_keeps_no_hash_or_proof_of_an_earlier_one(db):
    products = db["products"]
    products.insert_one(_anchored())
    update = rejected_update(SPEC, "p1", TS, version=VERSION + 5, reason="too_large",
                             message="y" * 1000)  # fmt: skip

    bulk_update(products, [update], "dead-letter status")
    stored = products.find_one({"_id": "p1"})
    assert stored["certyo_status"] == "rejected"
    assert stored["certyo_version"] == VERSION + 5
    assert stored["certyo_failure_reason"] == "too_large: " + "y" * 300
    assert not {k for k in stored if k.startswith("certyo_")} - {
        "certyo_status",
        "certyo_version",
        "certyo_failure_reason",
    }
    # Without a version or a date there is nothing to pin the document to.
    assert rejected_update(SPEC, "p1", TS, version=None, reason="r", message="m") is None
    assert rejected_update(SPEC, "p1", [TS], version=VERSION, reason="r", message="m") is None


def test_resolving_closes_only_the_open_letters_of_those_documents(db):
    letters = db[DEAD_LETTERS_COLLECTION]
    letters.insert_many(
        [
            {"_id": "a", "collection": "products", "documentId": "p1", "resolvedAt": None},
            {"_id": "b", "collection": "products", "documentId": "p2", "resolvedAt": None},
            {"_id": "c", "collection": "orders", "documentId": "p1", "resolvedAt": None},
            {"_id": "d", "collection": "products", "documentId": "p1", "resolvedAt": TS},
        ]
    )
    bulk_update(letters, [resolve_letters(SPEC, ["p1"], run_id="run-2", now=NOW)], "resolution")

    by_id = {d["_id"]: d for d in letters.find()}
    assert (by_id["a"]["resolvedAt"], by_id["a"]["resolvedByRun"]) == (NOW, "run-2")
    assert by_id["b"]["resolvedAt"] is None and by_id["c"]["resolvedAt"] is None
    assert by_id["d"]["resolvedAt"] == TS and "resolvedByRun" not in by_id["d"]


class LosesOneInsertRace:
    """A collection where another writer inserts letter `racing` just before our upsert of it
    (what MongoDB answers then: E11000 for that upsert, the others applied)."""

    def __init__(self, collection, racing: str):
        self._collection = collection
        self._racing = racing
        self.calls = 0

    def bulk_write(self, ops, ordered=True):
        self.calls += 1
        if self.calls > 1:
            return self._collection.bulk_write(ops, ordered=ordered)
        index = next(i for i, op in enumerate(ops) if op._filter["_id"] == self._racing)
        others = [op for i, op in enumerate(ops) if i != index]
        self._collection.bulk_write(others, ordered=False)
        self._collection.insert_one({"_id": self._racing, "attempts": 1})
        raise BulkWriteError(
            {"writeErrors": [{"index": index, "code": 11000, "errmsg": "E11000 duplicate key"}]}
        )


def test_a_letter_upsert_that_loses_an_insert_race_is_applied_once_more(db):
    letters = db[DEAD_LETTERS_COLLECTION]
    ops = [
        dead_letter_upsert(
            SPEC,
            doc_id,
            TS,
            version=VERSION,
            reason="r",
            message="m",
            stage="ingest",
            run_id="run",
            partition_key=None,
            now=NOW,
        )  # fmt: skip
        for doc_id in ("p1", "p2")
    ]
    racing = LosesOneInsertRace(letters, f"productdb.products:p2:{VERSION}")

    bulk_upsert(racing, ops, "dead letters")

    assert racing.calls == 2
    assert letters.find_one({"_id": f"productdb.products:p1:{VERSION}"})["attempts"] == 1
    assert letters.find_one({"_id": f"productdb.products:p2:{VERSION}"})["attempts"] == 2


def test_any_other_bulk_write_error_names_what_failed(db):
    class Broken:
        def bulk_write(self, ops, ordered=True):
            raise BulkWriteError({"writeErrors": [{"index": 0, "code": 121, "errmsg": "invalid"}]})

    with pytest.raises(PyMongoError, match="dead letters failed for 1 documents"):
        bulk_upsert(Broken(), [resolve_letters(SPEC, [], run_id="r", now=NOW)], "dead letters")
