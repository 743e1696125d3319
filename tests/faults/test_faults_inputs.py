"""Fault matrix: poison inputs. Each becomes a dead letter or a correct record, never a crash
and never a hang.

Invalid UTF-8 and lone surrogates are stored as raw BSON bytes, the way legacy writers left
them, and read back through the pipeline's client (`unicode_decode_error_handler=
"surrogateescape"`, as `certyo_dagster.source.mongo` configures it). MongoDB stores such bytes
as sent; SecantusDB refuses them on insert. Against a server that refuses them, and only
then, the valid document is stored and the watched collection's cursors apply the same byte
patch on the way out (`RawBytesMongoResource`): no server there can produce these bytes.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from typing import Any

import pytest
from bson import Binary, Int64, ObjectId, decode, encode
from fixtures.ledger import drive, reconfigured
from fixtures.mongo import insert_raw
from fixtures.pipeline import hour

from certyo_dagster.source.mongo import SURROGATE_ESCAPE_CODEC, MongoResource

CONFIG = {"batch_size": 13, "max_in_flight": 2, "max_payload_bytes": 20_000}


def _patched(doc: dict) -> bytes:
    raw = encode({k: v for k, v in doc.items() if k != "_raw_patch"})
    for old, new in doc["_raw_patch"]:
        raw = raw.replace(bytes.fromhex(old), bytes.fromhex(new))
    return raw


def _as_mongodb_returns_it(doc: dict) -> dict:
    if not doc.get("_raw_patch"):
        return doc
    return decode(_patched(doc), SURROGATE_ESCAPE_CODEC)


class _PatchedCursor:
    def __init__(self, cursor: Any):
        self._cursor = cursor

    def batch_size(self, size: int) -> _PatchedCursor:
        self._cursor = self._cursor.batch_size(size)
        return self

    def close(self) -> None:
        self._cursor.close()

    def __iter__(self) -> Iterator[dict]:
        return (_as_mongodb_returns_it(d) for d in self._cursor)


class _PatchedDatabase:
    """The database, except that `products` cursors return patched documents."""

    def __init__(self, database: Any):
        self._database = database

    def __getitem__(self, name: str) -> Any:
        collection = self._database[name]
        if name != "products":
            return collection

        class PatchedCollection:
            def find(self, *args: Any, **kwargs: Any) -> _PatchedCursor:
                return _PatchedCursor(collection.find(*args, **kwargs))

            def __getattr__(self, attribute: str) -> Any:
                return getattr(collection, attribute)

        return PatchedCollection()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._database, name)


class RawBytesMongoResource(MongoResource):
    def get_database(self):
        return _PatchedDatabase(super().get_database())


def _write_all(ledger: Any, docs: Iterable[dict]) -> bool:
    """Store every document; True when the server stored the raw bytes themselves."""
    stored_raw = True
    for doc in docs:
        if not doc.get("_raw_patch"):
            ledger.write(doc)
        elif stored_raw and insert_raw(ledger.collection, _patched(doc)):
            ledger.adopt(doc["_id"])
        else:
            stored_raw = False
            entry = ledger.write(doc)
            entry.document = _as_mongodb_returns_it(entry.document)
    return stored_raw


def _nested(depth: int) -> dict:
    deep: dict = {"leaf": 1}
    for _ in range(depth - 1):
        deep = {"nested": deep}
    return deep


def _poison_documents() -> list[dict]:
    ts = iter(hour(4, minute=m) for m in range(60))
    # Same-length byte patches keep the BSON lengths valid.
    e_acute, latin1_e_acute = "c3a9", "e920"  # Latin-1 0xE9, then a space: invalid UTF-8
    # "abc" becomes a UTF-16 surrogate encoded like a code point (CESU-8): lone surrogates.
    abc, cesu_surrogate = "616263", "eda080"
    return [
        {"_id": "too-big", "updatedAt": next(ts), "blob": "x" * 40_000},
        {"_id": "deep-150", "updatedAt": next(ts), "spec": _nested(150)},
        {"_id": "deep-100", "updatedAt": next(ts), "spec": _nested(98)},  # MongoDB's own cap
        {"_id": "latin1", "updatedAt": next(ts), "name": "caf\u00e9",
         "_raw_patch": [(e_acute, latin1_e_acute)]},
        {"_id": "surrogate-value", "updatedAt": next(ts), "name": "abcd",
         "_raw_patch": [(abc, cesu_surrogate)]},
        {"_id": "surrogate-key", "updatedAt": next(ts), "abcd": 1,
         "_raw_patch": [(abc, cesu_surrogate)]},
        {"_id": "dots-and-dollars", "updatedAt": next(ts), "a.b": 1,
         "nested": {"x.y": {"$z": True}, "$price": "9.90"}},
        {"_id": "nan", "updatedAt": next(ts), "score": float("nan"), "inf": float("inf")},
        {"_id": "int64-limits", "updatedAt": next(ts), "max": Int64(2**63 - 1),
         "min": Int64(-(2**63)), "safe": 2**53 - 1, "unsafe": 2**53 + 1},
        {"_id": ObjectId(), "updatedAt": next(ts), "kind": "objectid"},
        {"_id": 42, "updatedAt": next(ts), "kind": "int"},
        {"_id": Int64(2**63 - 1), "updatedAt": next(ts), "kind": "int64"},
        {"_id": Binary.from_uuid(uuid.UUID(int=7)), "updatedAt": next(ts), "kind": "uuid"},
        {"_id": {"region": "eu", "n": 7}, "updatedAt": next(ts), "kind": "compound"},
        {"_id": "", "updatedAt": next(ts), "kind": "empty string id"},
    ]  # fmt: skip


@pytest.mark.timeout(120)
def test_poison_inputs_become_dead_letters_or_correct_records_never_a_crash(pipeline, loss_ledger):
    if _write_all(loss_ledger, _poison_documents()):
        raw = pipeline
    else:
        current = pipeline.resources["mongo"]
        raw = reconfigured(pipeline, mongo=RawBytesMongoResource(**current.model_dump()))

    cursor, failed = drive(raw, loss_ledger, config=CONFIG)

    assert not failed
    letters = {d["documentId"]: d["reason"] for d in pipeline.db["_certyo_dead_letters"].find()}
    print("dead letters:", letters)
    assert letters == {
        "too-big": "too_large",
        "deep-150": "too_deep",
        "latin1": "invalid_unicode",
        "surrogate-value": "invalid_unicode",
        "surrogate-key": "invalid_unicode",
        "": "certyo_validation",  # Certyo requires a non-empty recordId
    }
    # Every version is accounted for; the ledger recomputes each accepted record's hash from
    # the stored document, so a record in a lossy shape would show as wrong_hash.
    counts = loss_ledger.check()
    counts.assert_clean("8 poison inputs")
    by_id = {r["recordId"]: r for r in loss_ledger.certyo_records()}
    assert by_id["int64-limits"]["recordPayload"]["max"] == str(2**63 - 1)
    assert by_id["9223372036854775807"]["recordPayload"]["kind"] == "int64"
    assert by_id["00000000-0000-0000-0000-000000000007"]["recordPayload"]["kind"] == "uuid"
    nested = by_id["dots-and-dollars"]["recordPayload"]["nested"]
    assert nested == {"x.y": {"$z": True}, "$price": "9.90"}
    assert by_id["deep-100"]
    # A later edit of a poison document is a new version, tried again; its letter resolves.
    loss_ledger.update("too-big", {"blob": "small", "updatedAt": hour(4, 59)})
    cursor, failed = drive(raw, loss_ledger, cursor, config=CONFIG)
    assert not failed
    loss_ledger.check(verify=False).assert_clean("8 poison inputs, fixed")
    resolved = pipeline.db["_certyo_dead_letters"].find_one({"documentId": "too-big"})
    assert resolved["resolvedAt"] is not None


def test_a_thousand_levels_of_nesting_is_a_dead_letter_not_a_recursion_error(pipeline):
    # MongoDB cannot store this (100 levels at most); the sanitizer must still refuse it cleanly.
    from certyo_dagster.sanitize.documents import PoisonDocumentError
    from certyo_dagster.sanitize.records import to_certyo_record

    doc = {"_id": "deep-1000", "updatedAt": hour(4), "spec": _nested(1000)}
    with pytest.raises(PoisonDocumentError) as caught:
        to_certyo_record(doc, pipeline.spec(), "tenant-a")
    assert caught.value.reason == "too_deep"
