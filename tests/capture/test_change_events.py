"""The change-event mapping and the position bookkeeping: pure, no server, no Dagster."""

from __future__ import annotations

from datetime import datetime, timezone

import orjson
import pytest
from bson import ObjectId, Timestamp

from certyo_dagster.capture.change_events import (
    LOOKUP_MISSING,
    Ack,
    StreamPosition,
    acknowledged_prefix,
    cluster_int,
    event_idempotency_key,
    event_time,
    event_version,
    is_certyo_only_update,
    map_event,
    map_snapshot_document,
    snapshot_version,
    token_digest,
)
from certyo_dagster.sanitize.records import CertyoRecordEncoder, encode_record, idempotency_key
from certyo_dagster.settings import CollectionSpec, ConfigError, PipelineSettings

SPEC = CollectionSpec("shop", "orders", capture="change_stream")
TENANT = "tenant-a"


def _token(n: int) -> dict:
    # MongoDB's token layout: a type byte, then the cluster time, then more; SecantusDB's is
    # a BSON document in hex. The mapping treats both as opaque.
    return {"_data": f"82{n:016x}2B022C0100296E5A1004{n:032x}46645F69640064"}


def _event(op: str, n: int, doc_id=1, *, ts=None, wall=True, **extra) -> dict:
    ts = ts or Timestamp(1_796_135_817, n)
    event = {
        "_id": _token(n),
        "operationType": op,
        "clusterTime": ts,
        "documentKey": {"_id": doc_id},
        "ns": {"db": "shop", "coll": "orders"},
    }
    if wall:
        event["wallTime"] = datetime(2026, 12, 1, 14, 36, 57, 870000)
    if op in ("insert", "replace"):
        event["fullDocument"] = {"_id": doc_id, "n": n}
    event.update(extra)
    return event


def test_operation_types_map_to_insert_update_delete():
    assert map_event(_event("insert", 1), SPEC, TENANT).as_record()["operationType"] == "insert"
    update = _event("update", 2, fullDocument={"_id": 1, "n": 2})
    assert map_event(update, SPEC, TENANT).as_record()["operationType"] == "update"
    assert map_event(_event("replace", 3), SPEC, TENANT).as_record()["operationType"] == "update"
    assert map_event(_event("delete", 4), SPEC, TENANT).as_record()["operationType"] == "delete"
    with pytest.raises(ValueError):
        map_event(_event("createIndexes", 5), SPEC, TENANT)


def test_a_delete_attests_only_the_id_and_the_marker():
    record = map_event(
        _event("delete", 4, doc_id=ObjectId("6b0edb77adadca769b7f5b49")), SPEC, TENANT
    )
    body = record.as_record()
    assert body["recordPayload"] == {"_id": "6b0edb77adadca769b7f5b49", "_deleted": True}
    assert body["recordId"] == "6b0edb77adadca769b7f5b49"  # the same id mapping as polling


def test_an_update_whose_post_image_is_gone_is_attested_not_dropped():
    body = map_event(_event("update", 6, fullDocument=None), SPEC, TENANT).as_record()
    assert body["operationType"] == "update"
    assert body["recordPayload"] == {"_id": 1, LOOKUP_MISSING: True}


def test_source_time_is_wall_time_else_the_cluster_time_seconds_in_utc():
    assert event_time(_event("insert", 1)) == datetime(
        2026, 12, 1, 14, 36, 57, 870000, tzinfo=timezone.utc
    )
    without_wall = _event("insert", 1, wall=False, ts=Timestamp(1_796_135_817, 99))
    assert event_time(without_wall) == datetime.fromtimestamp(1_796_135_817, tz=timezone.utc)
    body = map_event(without_wall, SPEC, TENANT).as_record()
    assert body["sourceTimestamp"] == "2026-12-01T14:36:57.000+00:00"


def test_pitfall_cluster_time_to_number_is_not_seconds():
    """The reference multiplies the whole 64-bit Timestamp by 1000: not a date at all."""
    ts = Timestamp(1_796_135_817, 2)
    with pytest.raises((OverflowError, ValueError, OSError)):
        datetime.fromtimestamp(cluster_int(ts) * 1000 / 1000, tz=timezone.utc)
    assert event_time(_event("insert", 1, wall=False, ts=ts)).year == 2026


def test_pitfall_idempotency_key_holds_the_whole_position_not_a_16_character_prefix():
    """Two changes of one document in the same second differ only after the 16th character
    of the token in MongoDB's layout; a 16-character prefix would give them one key."""
    first = _event("update", 1, fullDocument={"_id": 1, "n": 1}, ts=Timestamp(1_796_135_817, 1))
    second = _event("update", 2, fullDocument={"_id": 1, "n": 1}, ts=Timestamp(1_796_135_817, 2))
    first["_id"] = {"_data": "8269E1A2B3000000012B022C0100296E5A1004AA"}
    second["_id"] = {"_data": "8269E1A2B3000000022B022C0100296E5A1004AA"}
    assert first["_id"]["_data"][:16] == second["_id"]["_data"][:16]
    a, b = map_event(first, SPEC, TENANT), map_event(second, SPEC, TENANT)
    assert a.as_record()["idempotencyKey"] != b.as_record()["idempotencyKey"]
    assert a.version != b.version
    assert token_digest(first["_id"]) in a.as_record()["idempotencyKey"]


def test_a_replayed_event_maps_to_the_same_key_and_version():
    event = _event("insert", 7)
    again = orjson.loads(orjson.dumps(event, default=str))  # a copy, as a resumed stream sends
    again["clusterTime"] = event["clusterTime"]
    again["wallTime"] = event["wallTime"]
    assert map_event(event, SPEC, TENANT).json == map_event(again, SPEC, TENANT).json


def test_versions_sort_in_stream_order_and_snapshots_sort_first():
    versions = [
        event_version(_event("insert", n, ts=Timestamp(1_796_135_817, n))) for n in (1, 2, 300)
    ]
    versions.append(event_version(_event("insert", 4, ts=Timestamp(1_796_135_818, 1))))
    assert versions == sorted(versions)
    assert snapshot_version(Timestamp(1_796_135_817, 0)) < versions[0]


def test_idempotency_keys_stay_bounded_for_long_ids():
    event = _event("delete", 1, doc_id="x" * 5000)
    key = event_idempotency_key(SPEC, "x" * 5000, event)
    assert len(key) <= 200 + 64
    assert token_digest(event["_id"]) in key


def test_pitfall_write_back_filter_uses_the_certyo_prefix_not_a_fixed_list():
    ours = {
        "updatedFields": {"certyo_status": "pending", "certyo_tx_hash": "0x1"},
        "removedFields": ["certyo_failure_reason"],
    }
    assert is_certyo_only_update(_event("update", 1, updateDescription=ours))
    mixed = {"updatedFields": {"certyo_status": "x", "price": 2}, "removedFields": []}
    assert not is_certyo_only_update(_event("update", 1, updateDescription=mixed))
    removed_user_field = {"updatedFields": {}, "removedFields": ["price"]}
    assert not is_certyo_only_update(_event("update", 1, updateDescription=removed_user_field))
    assert not is_certyo_only_update(_event("insert", 1))


def test_one_mapping_gives_pollings_bytes():
    spec = CollectionSpec("shop", "orders")
    doc = {
        "_id": ObjectId("6b0edb77adadca769b7f5b49"),
        "updatedAt": datetime(2026, 1, 2, 3, 4, 5, 678000),
        "p": 1.5,
        "certyo_status": "x",
    }
    polled = CertyoRecordEncoder(spec, TENANT).encode(doc)
    general = encode_record(
        spec,
        TENANT,
        doc_id=doc["_id"],
        operation="upsert",
        document=doc,
        source_time=doc["updatedAt"],
        version=str(polled.version),
        idempotency_key=idempotency_key(spec, polled.record_id, polled.version),
    )
    assert general.json == polled.json


def test_snapshot_records_are_upserts_with_the_snapshot_version():
    version = snapshot_version(Timestamp(1_796_135_817, 5))
    record = map_snapshot_document(
        {"_id": 3, "a": 1},
        SPEC,
        TENANT,
        version=version,
        read_at=datetime(2026, 12, 1, tzinfo=timezone.utc),
    )
    body = record.as_record()
    assert body["operationType"] == "upsert"
    assert body["recordVersion"] == version
    assert body["sourceTimestamp"] == "2026-12-01T00:00:00.000+00:00"


# -- the position bookkeeping --------------------------------------------------------------


def _batch(n: int):
    tokens = [_token(i) for i in range(n)]
    times = [Timestamp(1_796_135_817, i + 1) for i in range(n)]
    ids = [str(i) for i in range(n)]
    return tokens, times, ids


def test_pitfall_token_is_never_saved_after_a_failed_ingestion():
    tokens, times, ids = _batch(3)
    advance = acknowledged_prefix(tokens, times, ids, [], batch_end_token={"_data": "ff"})
    assert advance.token is None and advance.acknowledged == 0


def test_pitfall_out_of_order_acks_only_move_the_position_over_the_prefix():
    """Acks of events 0, 2 and 3 (event 1's call failed): the position stops after 0."""
    tokens, times, ids = _batch(4)
    acks = [Ack(3, "accepted"), Ack(0, "accepted"), Ack(2, "accepted")]
    advance = acknowledged_prefix(tokens, times, ids, acks, batch_end_token=None)
    assert advance.acknowledged == 1
    assert advance.token == tokens[0]
    assert advance.cluster_time == times[0]


def test_a_fully_acknowledged_drained_batch_moves_to_the_post_batch_token():
    tokens, times, ids = _batch(2)
    acks = [Ack(0, "accepted"), Ack(1, "rejected")]
    end = {"_data": "ff"}
    advance = acknowledged_prefix(tokens, times, ids, acks, batch_end_token=end)
    assert advance.token == end and advance.last_record_id == "1"


def test_pitfall_heartbeat_a_quiet_batch_moves_to_the_post_batch_token():
    advance = acknowledged_prefix([], [], [], [], batch_end_token={"_data": "ee"})
    assert advance.token == {"_data": "ee"}


def test_the_position_round_trips_through_its_document():
    position = StreamPosition(
        resume_token=_token(1),
        cluster_time=Timestamp(1, 2),
        last_record_id="9",
        phase="snapshot",
        snapshot_version="x",
        snapshot_after_id=ObjectId(),
        snapshot_has_after_id=True,
        snapshot_documents=12,
    )
    assert StreamPosition.from_document(position.to_document()) == position
    assert StreamPosition.from_document(None) is None
    assert "sha256:" in position.describe()


# -- settings ------------------------------------------------------------------------------


def test_capture_mode_from_the_environment():
    settings = PipelineSettings.from_env(
        {"CERTYO_CAPTURE": "change_stream", "CERTYO_COLLECTIONS": "a,b"}
    )
    assert [s.capture for s in settings.collections] == ["change_stream", "change_stream"]
    assert PipelineSettings.from_env({}).collections[0].capture == "polling"
    with pytest.raises(
        ConfigError, match="CERTYO_CAPTURE='stream' must be one of polling, change_stream"
    ):
        PipelineSettings.from_env({"CERTYO_CAPTURE": "stream"})
    with pytest.raises(ConfigError, match="capture .cdc. of collection"):
        CollectionSpec("db", "c", capture="cdc")  # type: ignore[arg-type]
