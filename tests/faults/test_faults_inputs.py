"""Fault matrix: poison inputs. Each becomes a dead letter or a correct record, never a crash
and never a hang.

mongomock cannot hold invalid UTF-8 or lone surrogates; a real server can. The `mongo`
resource here hands out documents the way pymongo decodes such bytes
(`unicode_decode_error_handler="surrogateescape"`, as `certyo_dagster.source.mongo` configures it):
a document carrying `_raw_patch` is encoded to BSON, the patch is applied to the bytes, and
it is decoded again.
"""

from __future__ import annotations

import uuid

import pytest
from bson import Binary, Int64, ObjectId, decode, encode
from bson.codec_options import CodecOptions
from fixtures.ledger import drive, reconfigured
from fixtures.mongo import WrappedDatabase
from fixtures.pipeline import hour

from certyo_dagster.source.mongo import MongoResource

RAW_DECODE = CodecOptions(unicode_decode_error_handler="surrogateescape")
CONFIG = {"batch_size": 13, "max_in_flight": 2, "max_payload_bytes": 20_000}


def _as_a_real_server_returns_it(doc: dict) -> dict:
    patch = doc.get("_raw_patch")
    if not patch:
        return doc
    raw = encode(doc)
    for old, new in patch:
        raw = raw.replace(bytes.fromhex(old), bytes.fromhex(new))
    return decode(raw, RAW_DECODE)


def _raw_documents(docs):
    return (_as_a_real_server_returns_it(d) for d in docs)


class RawBytesMongoResource(MongoResource):
    def get_database(self):
        return WrappedDatabase(super().get_database(), "products", _raw_documents)


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
    current = pipeline.resources["mongo"]
    raw = reconfigured(pipeline, mongo=RawBytesMongoResource(**current.model_dump()))
    for doc in _poison_documents():
        loss_ledger.write(doc)

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
    # mongomock (like MongoDB) cannot store this; the sanitizer must still refuse it cleanly.
    from certyo_dagster.sanitize.documents import PoisonDocumentError
    from certyo_dagster.sanitize.records import to_certyo_record

    doc = {"_id": "deep-1000", "updatedAt": hour(4), "spec": _nested(1000)}
    with pytest.raises(PoisonDocumentError) as caught:
        to_certyo_record(doc, pipeline.spec(), "tenant-a")
    assert caught.value.reason == "too_deep"
