"""Change-stream capture against SecantusDB and the sandbox, over the wire, without Dagster.

Each scenario ends with the stream ledger: every write arrives once, as a record with the
write's operation type, or as a dead letter, and the saved position never passes a write
Certyo did not acknowledge.
"""

from __future__ import annotations

import random
import time

import pymongo
import pytest
from fixtures.ledger import StreamLedger
from fixtures.mongo import REAL_URI
from fixtures.sandbox import TENANT_A, fast_client

from certyo_dagster.capture.change_events import LOOKUP_MISSING, event_version
from certyo_dagster.capture.change_stream import (
    GAPS_COLLECTION,
    ChangeStreamCapture,
    StreamFailedError,
    StreamGapError,
    peek,
    read_position,
)
from certyo_dagster.fields import CURSORS_COLLECTION
from certyo_dagster.settings import CollectionSpec

BULK = "/api/v1/records/bulk"
SINGLE = "/api/v1/records"
FP_APP = "certyo-stream-test"


def _spec(target, name="items") -> CollectionSpec:
    return CollectionSpec(target.database, name, capture="change_stream")


def _capture(db, spec, client, **options) -> ChangeStreamCapture:
    options.setdefault("max_await_ms", 200)
    return ChangeStreamCapture(
        database=db, spec=spec, client=client, tenant_id=TENANT_A, run_id="test", **options
    )


def _fail_point(uri: str, command: str, **data) -> None:
    """failCommand once on `command`, only for clients named FP_APP."""
    with pymongo.MongoClient(uri) as admin:
        admin.admin.command(
            "configureFailPoint",
            "failCommand",
            mode={"times": 1},
            data={"failCommands": [command], "appName": FP_APP, **data},
        )


def _fail_point_off(uri: str) -> None:
    with pymongo.MongoClient(uri) as admin:
        admin.admin.command("configureFailPoint", "failCommand", mode="off")


@pytest.fixture
def db(mongo):
    client = pymongo.MongoClient(mongo.uri, appname=FP_APP, heartbeatFrequencyMS=500)
    yield client[mongo.database]
    client.close()


@pytest.fixture
def ledger(db, mongo, certyo_client, sandbox) -> StreamLedger:
    return StreamLedger(db, _spec(mongo), certyo_client, sandbox)


def test_snapshot_then_stream_covers_every_document_and_every_operation_once(
    db, mongo, certyo_client, ledger
):
    spec = _spec(mongo)
    ledger.seed([{"_id": i, "n": 0} for i in range(30)])
    first = _capture(db, spec, certyo_client, batch_size=7).run()
    assert first.snapshot_complete and first.snapshot_read == 30
    ledger.history(random.Random(3), 80, list(range(40)))
    second = _capture(db, spec, certyo_client, batch_size=25).run()
    assert second.events == 80 and not second.snapshot_complete
    assert set(second.tally.by_operation) == {"insert", "update", "replace", "delete"}
    counts = ledger.check()
    counts.assert_clean("stream: snapshot then 80 writes")
    assert counts.required == 110 and counts.accepted == 110
    # A replay of the same run ships nothing new: the position covers all of it.
    assert _capture(db, spec, certyo_client).run().events == 0


def test_pitfall_write_back_does_not_feed_back_into_the_stream(db, mongo, certyo_client):
    spec = _spec(mongo)
    _capture(db, spec, certyo_client).run()
    db.items.insert_one({"_id": 1, "n": 1})
    report = _capture(db, spec, certyo_client).run()
    assert report.events == 1 and db.items.find_one({"_id": 1})["certyo_status"] == "pending"
    # Our write-back, and any other certyo_* field (not just a fixed list), are no changes.
    db.items.update_one({"_id": 1}, {"$set": {"certyo_tx_hash": "0x1", "certyo_new_field": 2}})
    db.items.update_one({"_id": 1}, {"$unset": {"certyo_new_field": ""}})
    again = _capture(db, spec, certyo_client).run()
    assert again.events == 0 and again.shipped == 0
    db.items.update_one({"_id": 1}, {"$set": {"n": 2, "certyo_status": "x"}})
    assert _capture(db, spec, certyo_client).run().shipped == 1


def test_two_updates_of_one_document_within_one_second_give_two_records(
    db, mongo, certyo_client, ledger
):
    spec = _spec(mongo)
    _capture(db, spec, certyo_client).run()
    ledger.insert({"_id": "a", "n": 0})
    first = ledger.update("a", {"n": 1})
    second = ledger.update("a", {"n": 2})
    assert first.cluster >> 32 == second.cluster >> 32  # the same second
    _capture(db, spec, certyo_client).run()
    updates = [r for r in ledger.records() if r["operationType"] == "update"]
    assert len(updates) == 2
    assert len({r["idempotencyKey"] for r in updates}) == 2
    assert len({r["recordVersion"] for r in updates}) == 2
    ledger.check().assert_clean("two updates in one second")


def test_pitfall_quiet_collection_saves_the_post_batch_token(secantus_factory, certyo_client):
    """A real replica set writes a no-op every 10 s, so the post-batch token of a quiet stream
    keeps moving; this server does it with --noop-heartbeat-seconds."""
    server = secantus_factory(storage=None, extra_args=["--noop-heartbeat-seconds", "1"])
    with pymongo.MongoClient(server.uri) as client:
        db = client["quiet"]
        spec = CollectionSpec("quiet", "items", capture="change_stream")
        db.items.insert_one({"_id": 1})
        _capture(db, spec, certyo_client).run()
        before = read_position(db, spec).resume_token
        time.sleep(2.5)
        report = _capture(db, spec, certyo_client).run()
        assert report.events == 0 and report.heartbeat
        after_run = read_position(db, spec).resume_token
        assert after_run != before
        time.sleep(2.5)
        found = peek(db, spec)
        assert found.kind == "quiet" and found.heartbeat
        assert read_position(db, spec).resume_token != after_run
        # The advanced token still resumes: the next write is delivered.
        db.items.insert_one({"_id": 2})
        assert _capture(db, spec, certyo_client).run().events == 1


def test_pitfall_failed_ingestion_leaves_the_token_then_the_retry_ships_it(
    db, mongo, certyo_client, sandbox, ledger
):
    spec = _spec(mongo)
    _capture(db, spec, certyo_client).run()
    for i in range(40):
        ledger.insert({"_id": i, "n": i})
    saved = read_position(db, spec)
    sandbox.script_faults([{"path": BULK, "status": 503, "times": 50}])
    with pytest.raises(StreamFailedError, match="Certyo failed") as failed:
        _capture(db, spec, certyo_client, batch_size=20).run()
    assert f"{spec.database}.{spec.collection}" in str(failed.value)
    assert "Saved position: resume token sha256:" in str(failed.value)
    assert read_position(db, spec).resume_token == saved.resume_token
    assert ledger.note_cursor() == 0
    sandbox.clear_faults()
    _capture(db, spec, certyo_client, batch_size=20).run()
    ledger.check().assert_clean("503 outage then retry")


def test_503_and_429_storms_then_an_outage_lose_nothing(db, mongo, certyo_client, sandbox, ledger):
    spec = _spec(mongo)
    ledger.seed([{"_id": i, "n": 0} for i in range(25)])
    sandbox.script_faults(
        [
            {"path": BULK, "status": 503, "times": 2},
            {"path": BULK, "status": 429, "retry_after": 0.05, "times": 1},
        ]
    )
    _capture(db, spec, certyo_client, batch_size=12).run()  # the client's retries ride it out
    ledger.history(random.Random(5), 60, list(range(30)))
    sandbox.script_faults([{"path": BULK, "status": 429, "retry_after": 0.01, "times": 3}])
    _capture(db, spec, certyo_client, batch_size=12).run()
    ledger.history(random.Random(6), 40, list(range(30)))
    sandbox.script_faults(
        [{"path": BULK, "status": 503, "times": 100}, {"path": SINGLE, "status": 503, "times": 100}]
    )
    with pytest.raises(StreamFailedError):
        _capture(db, spec, certyo_client, batch_size=12).run()
    sandbox.clear_faults()
    assert ledger.note_cursor() == 0
    _capture(db, spec, certyo_client, batch_size=12).run()
    ledger.check().assert_clean("503/429 storms, then an outage")


def test_connection_cut_on_get_more_is_resumed_once_without_loss(db, mongo, certyo_client, ledger):
    spec = _spec(mongo)
    _capture(db, spec, certyo_client).run()
    for i in range(15):
        ledger.insert({"_id": i})
    _fail_point(mongo.uri, "getMore", closeConnection=True)
    try:
        report = _capture(db, spec, certyo_client, batch_size=5).run()
    finally:
        _fail_point_off(mongo.uri)
    assert report.events == 15
    ledger.check().assert_clean("closeConnection on getMore")


@pytest.mark.parametrize(
    ("code", "reason"),
    [(286, "history_lost"), (280, "fatal_error"), (260, "invalid_resume_token")],
)
def test_lost_history_fatal_errors_and_bad_tokens_are_gaps_never_silent(
    db, mongo, certyo_client, ledger, code, reason
):
    spec = _spec(mongo)
    ledger.seed([{"_id": i} for i in range(5)])
    _capture(db, spec, certyo_client).run()
    ledger.insert({"_id": "late"})
    saved = read_position(db, spec)
    _fail_point(mongo.uri, "getMore", errorCode=code)
    try:
        with pytest.raises(StreamGapError) as gap:
            _capture(db, spec, certyo_client).run()
    finally:
        _fail_point_off(mongo.uri)
    message = str(gap.value)
    assert gap.value.reason == reason
    assert f"{spec.database}.{spec.collection}" in message and saved.describe() in message
    assert "resnapshot" in message
    assert read_position(db, spec).resume_token == saved.resume_token  # never skipped past
    row = db[GAPS_COLLECTION].find_one()
    assert row["collection"] == "items" and row["reason"] == reason and row["resolvedAt"] is None
    assert row["from"]["resumeToken"] == saved.resume_token and row["detectedAt"]
    gap_records = ledger.gap_records()
    assert len(gap_records) == 1 and gap_records[0]["recordHash"] == row["certyoRecordHash"]
    # Recovery: a resnapshot re-establishes coverage and resolves the gap.
    recovered = _capture(db, spec, certyo_client).run(resnapshot=True)
    assert recovered.snapshot_complete and recovered.resolved_gaps == 1
    assert db[GAPS_COLLECTION].find_one()["resolvedAt"] is not None
    ledger.check().assert_clean(f"gap {code} then resnapshot")


def test_a_collection_drop_is_a_gap_and_a_resnapshot_recovers(db, mongo, certyo_client, ledger):
    spec = _spec(mongo)
    ledger.seed([{"_id": i} for i in range(5)])
    _capture(db, spec, certyo_client).run()
    ledger.insert({"_id": "before-drop"})
    db.items.drop()
    with pytest.raises(StreamGapError) as gap:
        _capture(db, spec, certyo_client).run()
    assert gap.value.reason == "invalidated" and "drop" in str(gap.value)
    # The insert before the drop was shipped and the position stops in front of the drop,
    # so the next run finds the same gap again instead of skipping it.
    assert any(r["recordId"] == "before-drop" for r in ledger.records())
    with pytest.raises(StreamGapError):
        _capture(db, spec, certyo_client).run()
    assert db[GAPS_COLLECTION].count_documents({}) == 1
    assert len(ledger.gap_records()) == 1
    ledger.insert({"_id": "recreated"})
    recovered = _capture(db, spec, certyo_client).run(resnapshot=True)
    assert recovered.resolved_gaps == 1
    ledger.insert({"_id": "after"})
    _capture(db, spec, certyo_client).run()
    ledger.check().assert_clean("drop, gap, resnapshot")


def test_ten_thousand_events_in_one_burst(db, mongo, certyo_client, ledger):
    spec = _spec(mongo)
    _capture(db, spec, certyo_client).run()
    with db.client.start_session() as session:
        db.items.insert_many([{"_id": i, "n": i} for i in range(10_000)], session=session)
    report = _capture(db, spec, certyo_client, max_seconds=120).run()
    assert report.events == 10_000 and report.accepted == 10_000
    assert report.requests == 10  # bulk requests of 1000
    records = ledger.records()
    assert len(records) == 10_000
    assert len({r["idempotencyKey"] for r in records}) == 10_000
    assert {r["operationType"] for r in records} == {"insert"}
    assert db.items.count_documents({"certyo_status": "pending"}) == 10_000
    assert _capture(db, spec, certyo_client).run().events == 0


def test_our_filtered_write_backs_never_end_a_run_early(db, mongo, certyo_client, ledger):
    """A getMore that scans only filtered-out changes (our write-backs) comes back empty at
    once; that is not the end of the stream."""
    spec = _spec(mongo)
    _capture(db, spec, certyo_client).run()
    db.items.insert_many([{"_id": i} for i in range(1500)])
    assert _capture(db, spec, certyo_client).run().events == 1500
    for i in range(20):
        ledger.insert({"_id": f"after-{i}"})
    # The run reads on past the empty batches; under heavy load one getMore can take as
    # long as the server's wait, so a second run may be needed, never a lost event.
    runs = [_capture(db, spec, certyo_client, max_await_ms=500).run() for _ in range(2)]
    assert sum(r.events for r in runs) == 20
    records = ledger.records()
    assert len(records) == len({r["idempotencyKey"] for r in records}) == 1520


def test_max_events_bounds_a_run_and_the_next_run_continues(db, mongo, certyo_client, ledger):
    spec = _spec(mongo)
    _capture(db, spec, certyo_client).run()
    for i in range(30):
        ledger.insert({"_id": i})
    assert _capture(db, spec, certyo_client, max_events=12, batch_size=5).run().events == 12
    assert ledger.note_cursor() == 0
    assert _capture(db, spec, certyo_client, max_events=12).run().events == 12
    assert _capture(db, spec, certyo_client, max_events=12).run().events == 6
    ledger.check().assert_clean("bounded runs")


def test_update_then_delete_before_the_read_is_attested_not_dropped(
    db, mongo, certyo_client, ledger
):
    spec = _spec(mongo)
    _capture(db, spec, certyo_client).run()
    ledger.insert({"_id": "gone", "n": 0})
    ledger.update("gone", {"n": 1})
    ledger.delete("gone")
    report = _capture(db, spec, certyo_client).run()
    assert report.lookup_missing == 1
    update = next(r for r in ledger.records() if r["operationType"] == "update")
    assert update["recordPayload"] == {"_id": "gone", LOOKUP_MISSING: True}
    ledger.check().assert_clean("update then delete")


def test_a_poison_document_is_dead_lettered_and_the_stream_moves_on(
    db, mongo, certyo_client, ledger
):
    spec = _spec(mongo)
    _capture(db, spec, certyo_client).run()
    ledger.insert({"_id": "big", "blob": "x" * 40_000})
    ledger.insert({"_id": "fine"})
    report = _capture(db, spec, certyo_client, max_payload_bytes=20_000).run()
    assert report.dead_lettered == 1 and report.accepted == 1
    letter = db["_certyo_dead_letters"].find_one({"recordId": "big"})
    assert letter["reason"] == "too_large" and letter["version"].count("-") == 1
    ledger.check().assert_clean("poison in the stream")


def test_a_replay_after_a_lost_write_back_is_one_record(db, mongo, certyo_client, ledger):
    """Certyo accepted a batch but the position was not saved (a crash): the next run sends
    the same events again and Certyo answers with idempotent replays."""
    spec = _spec(mongo)
    _capture(db, spec, certyo_client).run()
    saved = db[CURSORS_COLLECTION].find_one({"_id": "items"})
    for i in range(12):
        ledger.insert({"_id": i})
    ledger.update(3, {"n": 1})
    _capture(db, spec, certyo_client).run()
    db[CURSORS_COLLECTION].replace_one({"_id": "items"}, saved)  # as if never saved
    db.items.update_many({}, {"$unset": {"certyo_version": ""}})  # nor written back
    again = _capture(db, spec, certyo_client).run()
    assert again.events == 13 and again.replayed + again.recorded_before == 13
    ledger.check().assert_clean("replay after a lost position")


def test_event_versions_are_unique_per_event_and_stable(db, mongo):
    with db.items.watch(max_await_time_ms=200) as stream:
        db.items.insert_one({"_id": 1})
        db.items.update_one({"_id": 1}, {"$set": {"a": 1}})
        events = [stream.try_next() for _ in range(2)]
    with db.items.watch(
        max_await_time_ms=200,
        start_after=None,
        resume_after=None,
        start_at_operation_time=events[0]["clusterTime"],
    ) as replay:
        again = [replay.try_next() for _ in range(2)]
    assert [event_version(e) for e in events] == [event_version(e) for e in again]
    assert len({event_version(e) for e in events}) == 2


@pytest.mark.skipif(
    not REAL_URI,
    reason="needs MongoDB's post-images: SecantusDB's whenAvailable/required return the "
    "current document, not the state after each update; set CERTYO_TEST_MONGO_URI",
)
def test_post_images_attest_the_state_after_each_update(db, mongo, sandbox, ledger):
    db.create_collection("items", changeStreamPreAndPostImages={"enabled": True})
    spec = _spec(mongo)
    with fast_client(sandbox) as client:
        _capture(db, spec, client, full_document="required").run()
        ledger.insert({"_id": 1, "v": 0})
        ledger.update(1, {"v": 1})
        ledger.update(1, {"v": 2})
        _capture(db, spec, client, full_document="required").run()
    payloads = [r["recordPayload"]["v"] for r in ledger.records() if r["operationType"] == "update"]
    assert sorted(payloads) == [1, 2]
