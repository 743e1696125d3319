"""The polling pipeline end to end: MongoDB → Dagster job → Certyo sandbox over HTTP.

Each defect of the reference poller (shared/reference/pitfalls.md, "Polling worker") has a
test named after it.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime

import pytest
from bson import Decimal128, ObjectId
from fixtures.mongo import insert_raw
from fixtures.pipeline import hour, pk

from certyo_dagster.sanitize.records import CertyoRecordEncoder
from certyo_dagster.ship.errors import CertyoUnavailableError
from certyo_dagster.ship.ingest import IngestFailedError, WindowIngestor
from certyo_dagster.ship.shipping import Shipper


def _product(i: int, ts: datetime, **extra) -> dict:
    return {"_id": ObjectId(), "sku": f"SKU-{i:06d}", "price": Decimal128("9.90"), "updatedAt": ts,
            **extra}  # fmt: skip


def _ingestor(pipeline, client, *, batch_size=1000, max_in_flight=4, **options) -> WindowIngestor:
    """The window loop of `ingest_products_window`, with `client` in place of the real one."""
    return WindowIngestor(
        database=pipeline.db,
        encoder=CertyoRecordEncoder(pipeline.spec(), "tenant-a"),
        shipper=Shipper(client, "tenant-a", batch_size=batch_size, max_in_flight=max_in_flight),
        run_id="test-run",
        **options,
    )


def test_one_partition_ships_every_version_and_writes_back_pending(pipeline):
    products = pipeline.db["products"]
    products.insert_many([_product(i, hour(2, minute=i % 60)) for i in range(25)])
    products.insert_one(_product(99, hour(3)))  # the next hour: not in this partition

    result = pipeline.materialize(pk(2))

    assert result.success
    records = pipeline.certyo_records(collection="products")
    assert len(records) == 25
    for doc in products.find({"updatedAt": {"$lt": hour(3)}}):
        assert doc["certyo_status"] == "pending"
        assert doc["certyo_record_hash"].startswith("sha256:")
        assert doc["certyo_version"] == int(
            (doc["updatedAt"] - datetime(1970, 1, 1)).total_seconds() * 1000
        )
    assert "certyo_status" not in products.find_one({"updatedAt": hour(3)})
    receipts = result.asset_materializations_for_node("ingest_products_window")
    by_key = {m.asset_key.to_user_string(): m.metadata for m in receipts}
    database = pipeline.spec().database
    assert by_key[f"{database}/products/ingestion_receipts"]["accepted"].value == 25
    assert by_key[f"{database}/products/changed_documents"]["extracted"].value == 25


def _records_by_id(pipeline) -> dict[str, list[dict]]:
    by_id: dict[str, list[dict]] = {}
    for record in pipeline.certyo_records(collection="products"):
        by_id.setdefault(record["recordId"], []).append(record)
    return by_id


def test_pitfall_limit_5000_then_save_now__12000_changes_in_one_hour_all_arrive(pipeline):
    products = pipeline.db["products"]
    products.insert_many(
        [_product(i, hour(4, minute=i % 60, second=i % 59, ms=i % 1000)) for i in range(12_000)]
    )

    result = pipeline.materialize(pk(4))

    assert result.success
    by_id = _records_by_id(pipeline)
    assert len(by_id) == 12_000
    assert all(len(versions) == 1 for versions in by_id.values())
    assert products.count_documents({"certyo_status": "pending"}) == 12_000
    stats = pipeline.sandbox.stats()
    assert stats["records_stored"] == 12_000


def test_pitfall_sort_on_updated_at_alone__3000_ties_across_batches_arrive_exactly_once(pipeline):
    products = pipeline.db["products"]
    tie = hour(5, minute=30)
    products.insert_many([_product(i, tie) for i in range(3_000)])
    # Ties with other _id types sort after ObjectIds ($gt alone would miss them).
    products.insert_many([{"_id": f"str-{i}", "updatedAt": tie} for i in range(5)])
    products.insert_many([{"_id": i, "updatedAt": tie} for i in range(5)])

    result = pipeline.materialize(pk(5), config={"batch_size": 333})

    assert result.success
    by_id = _records_by_id(pipeline)
    assert len(by_id) == 3_010
    assert sorted(len(v) for v in by_id.values()) == [1] * 3_010


def test_pitfall_daily_idempotency_key__two_updates_on_one_day_are_two_versions(pipeline):
    products = pipeline.db["products"]
    doc = _product(1, hour(6, minute=1))
    products.insert_one(doc)
    assert pipeline.materialize(pk(6)).success
    products.update_one(
        {"_id": doc["_id"]}, {"$set": {"price": Decimal128("12.50"), "updatedAt": hour(6, 40)}}
    )
    assert pipeline.materialize(pk(6)).success

    versions = _records_by_id(pipeline)[str(doc["_id"])]
    assert [v["recordVersion"] for v in versions] == [
        str(int((hour(6, 1) - datetime(1970, 1, 1)).total_seconds() * 1000)),
        str(int((hour(6, 40) - datetime(1970, 1, 1)).total_seconds() * 1000)),
    ]
    assert len({v["idempotencyKey"] for v in versions}) == 2
    assert versions[1]["recordPayload"]["price"] == "12.50"


def test_pitfall_naive_datetimes__every_timestamp_sent_carries_an_offset(pipeline):
    pipeline.db["products"].insert_one(
        _product(1, hour(7, 15, 30, 250), launchedAt=datetime(2020, 5, 17, 8, 30))
    )
    assert pipeline.materialize(pk(7)).success

    (record,) = pipeline.certyo_records(collection="products")
    assert record["sourceTimestamp"] == "2026-11-01T07:15:30.250+00:00"
    assert record["recordPayload"]["updatedAt"] == "2026-11-01T07:15:30.250+00:00"
    assert record["recordPayload"]["launchedAt"] == "2020-05-17T08:30:00.000+00:00"


def test_certyo_fields_are_not_part_of_the_payload_and_write_back_keeps_the_timestamp(pipeline):
    products = pipeline.db["products"]
    doc = _product(1, hour(8, 5), certyo_status="anchored", certyo_note="stale")
    products.insert_one(doc)
    assert pipeline.materialize(pk(8)).success

    (record,) = pipeline.certyo_records(collection="products")
    assert not [k for k in record["recordPayload"] if k.startswith("certyo_")]
    stored = products.find_one({"_id": doc["_id"]})
    assert stored["updatedAt"] == hour(8, 5)
    assert stored["certyo_status"] == "pending"


def test_rerun_sends_nothing_new_and_force_gives_only_replays(pipeline):
    products = pipeline.db["products"]
    products.insert_many([_product(i, hour(9, i)) for i in range(30)])
    assert pipeline.materialize(pk(9)).success
    before = pipeline.sandbox.stats()

    rerun = pipeline.materialize(pk(9))
    meta = _metadata(rerun, "ingestion_receipts")
    assert meta["sent"] == 0 and meta["skipped_already_acknowledged"] == 30
    assert pipeline.sandbox.stats()["records_stored"] == before["records_stored"] == 30

    forced = pipeline.materialize(pk(9), config={"force": True})
    meta = _metadata(forced, "ingestion_receipts")
    assert meta["sent"] == 30 and meta["replayed"] == 30 and meta["accepted"] == 0
    after = pipeline.sandbox.stats()
    assert after["records_stored"] == 30
    assert after["idempotent_replays"] == before["idempotent_replays"] + 30


def _metadata(result, asset: str) -> dict:
    for m in result.asset_materializations_for_node("ingest_products_window"):
        if m.asset_key.path[-1] == asset:
            return {k: getattr(v, "value", v) for k, v in m.metadata.items()}
    raise AssertionError(f"no materialization of {asset}")


def _check(result, name: str):
    (evaluation,) = [e for e in result.get_asset_check_evaluations() if e.check_name == name]
    return evaluation


def test_poison_documents_become_dead_letters_and_the_check_warns_while_the_run_succeeds(
    pipeline,
):
    products = pipeline.db["products"]
    good = [_product(i, hour(10, i)) for i in range(20)]
    deep: dict = {"leaf": 1}
    for _ in range(150):  # MongoDB itself stops at 100 levels; so does the sanitizer
        deep = {"nested": deep}
    poison = [
        {"_id": "deep", "updatedAt": hour(10, 30), "spec": deep},
        {"_id": "huge", "updatedAt": hour(10, 32), "blob": "x" * 2_000_000},
    ]
    products.insert_many(good + poison)

    result = pipeline.materialize(pk(10))

    assert result.success
    assert len(pipeline.certyo_records(collection="products")) == 20
    letters = {d["documentId"]: d for d in pipeline.db["_certyo_dead_letters"].find()}
    assert set(letters) == {"deep", "huge"}
    assert letters["deep"]["reason"] == "too_deep"
    assert letters["huge"]["reason"] == "too_large"
    assert all(d["runId"] == result.run_id and d["version"] for d in letters.values())
    check = _check(result, "no_dead_letters")
    assert not check.passed
    assert check.severity.value == "WARN"
    assert check.metadata["open_dead_letters"].value == 2
    assert products.find_one({"_id": "huge"})["certyo_status"] == "rejected"


def test_a_record_certyo_rejects_is_dead_lettered_and_the_rest_of_the_batch_is_accepted(
    pipeline,
):
    products = pipeline.db["products"]
    products.insert_many([_product(i, hour(11, i)) for i in range(15)])
    # An empty string is a legal MongoDB _id but Certyo requires a non-empty recordId.
    products.insert_one({"_id": "", "updatedAt": hour(11, 50), "name": "nameless"})

    result = pipeline.materialize(pk(11))

    assert result.success
    assert len(pipeline.certyo_records(collection="products")) == 15
    (letter,) = pipeline.db["_certyo_dead_letters"].find()
    assert letter["documentId"] == "" and letter["reason"] == "certyo_validation"
    assert "recordId" in letter["message"]
    assert not _check(result, "no_dead_letters").passed


def test_scripted_503_then_429_is_retried_and_the_run_succeeds(pipeline):
    pipeline.db["products"].insert_many([_product(i, hour(12, i)) for i in range(40)])
    pipeline.sandbox.script_faults(
        [{"status": 503, "times": 2}, {"status": 429, "retry_after": 0, "times": 1}]
    )

    result = pipeline.materialize(pk(12))

    assert result.success
    assert len(pipeline.certyo_records(collection="products")) == 40
    by_status = pipeline.sandbox.stats()["requests_by_status"]
    assert by_status.get("503") == 2 and by_status.get("429") == 1


def test_certyo_down_fails_the_run_marks_nothing_pending_and_keeps_last_sync(pipeline):
    products = pipeline.db["products"]
    products.insert_many([_product(i, hour(13, i)) for i in range(30)])
    first = pipeline.tick()
    cursor_before = pipeline.db["_certyo_cursors"].find_one({"_id": "poll_products"})
    pipeline.sandbox.script_faults([{"status": 503, "times": 100}])

    result = pipeline.materialize(pk(13), raise_on_error=False)

    assert not result.success
    failure = result.failure_data_for_node("ingest_products_window")
    assert "ingestion stopped" in failure.error.message
    assert products.count_documents({"certyo_status": {"$exists": True}}) == 0
    pipeline.sandbox.clear_faults()
    second = pipeline.tick(cursor=first.cursor)
    assert second.cursor == first.cursor
    cursor_after = pipeline.db["_certyo_cursors"].find_one({"_id": "poll_products"})
    assert cursor_before["lastSyncAt"] <= hour(13, 0)
    assert (cursor_after["lastSyncAt"], cursor_after["lastId"]) == (
        cursor_before["lastSyncAt"],
        cursor_before["lastId"],
    )


def test_a_later_batch_succeeding_after_an_earlier_failure_does_not_move_the_position(
    pipeline,
):
    products = pipeline.db["products"]
    products.insert_many([_product(i, hour(14, i % 60, i // 60)) for i in range(300)])
    first_batch = list(products.find({}, sort=[("updatedAt", 1), ("_id", 1)]).limit(100))
    first_ids = {str(d["_id"]).encode() for d in first_batch}
    real = pipeline.resources["certyo"].get_client()

    later_accepted = threading.Semaphore(0)

    class FirstBatchFails:
        """The real client, except that the bulk call carrying the first batch fails, and
        only after both later batches were accepted."""

        def ingest_record(self, record):
            return real.ingest_record(record)

        def post_bulk_body(self, body, count):
            if any(i in body for i in first_ids):
                assert later_accepted.acquire(timeout=30) and later_accepted.acquire(timeout=30)
                raise CertyoUnavailableError("Certyo unavailable (simulated)")
            response = real.post_bulk_body(body, count)
            later_accepted.release()
            return response

    ingestor = _ingestor(
        pipeline,
        FirstBatchFails(),
        batch_size=100,
        max_in_flight=3,
    )
    with pytest.raises(IngestFailedError) as caught:
        ingestor.run(hour(14), hour(15))

    # The later batches were accepted and written back; the first was not.
    pending = {d["_id"] for d in products.find({"certyo_status": "pending"})}
    assert len(pending) == 200
    assert not {d["_id"] for d in first_batch} & pending
    assert caught.value.report.acknowledged_through is None
    # The sensor's position stays before the first unacknowledged version.
    tick = pipeline.tick()
    assert [r.partition_key for r in tick.run_requests] == [pk(14)]
    mirror = pipeline.db["_certyo_cursors"].find_one({"_id": "poll_products"})
    assert (mirror["lastSyncAt"], mirror["lastId"]) == (first_batch[0]["updatedAt"], None)


def test_invalid_utf8_stored_in_mongodb_decodes_to_a_dead_letter_not_a_crash(pipeline):
    # Legacy writers stored Latin-1 bytes where UTF-8 belongs; MongoDB keeps them as sent.
    from bson import encode

    raw = encode({"_id": "legacy", "updatedAt": hour(1), "name": "cafe"})
    if not insert_raw(pipeline.db["products"], raw.replace(b"cafe", b"caf\xe9")):
        pytest.skip(
            "this server refuses invalid UTF-8 on insert (SecantusDB does, MongoDB does not); "
            "set CERTYO_TEST_MONGO_URI to a MongoDB deployment to run it"
        )
    pipeline.db["products"].insert_one(_product(1, hour(1, 5)))

    result = pipeline.materialize(pk(1))

    assert result.success
    (letter,) = pipeline.db["_certyo_dead_letters"].find()
    assert (letter["documentId"], letter["reason"]) == ("legacy", "invalid_unicode")
    assert len(pipeline.certyo_records(collection="products")) == 1


def test_invalid_utf8_as_the_pipeline_decodes_it_is_refused_by_the_sanitizer(pipeline):
    # The bytes above, decoded with the codec options the pipeline's database uses.
    from bson import decode, encode

    from certyo_dagster.sanitize.documents import PoisonDocumentError
    from certyo_dagster.sanitize.records import to_certyo_record
    from certyo_dagster.source.mongo import SURROGATE_ESCAPE_CODEC

    raw = encode({"_id": "legacy", "updatedAt": hour(1), "name": "cafe"})
    doc = decode(raw.replace(b"cafe", b"caf\xe9"), SURROGATE_ESCAPE_CODEC)
    with pytest.raises(PoisonDocumentError) as caught:
        to_certyo_record(doc, pipeline.spec(), "tenant-a")
    assert caught.value.reason == "invalid_unicode"


def test_a_document_edited_while_its_batch_is_in_flight_is_not_labelled_with_the_old_hash(
    pipeline,
):
    products = pipeline.db["products"]
    docs = [_product(i, hour(15, i)) for i in range(20)]
    products.insert_many(docs)
    edited = docs[3]["_id"]
    real = pipeline.resources["certyo"].get_client()

    class EditDuringPost:
        """The real client; while the bulk call is in flight, someone edits one document."""

        def ingest_record(self, record):
            return real.ingest_record(record)

        def post_bulk_body(self, body, count):
            response = real.post_bulk_body(body, count)
            products.update_one(
                {"_id": edited}, {"$set": {"price": Decimal128("1.00"), "updatedAt": hour(15, 59)}}
            )
            return response

    _ingestor(
        pipeline,
        EditDuringPost(),
    ).run(hour(15), hour(16))

    assert products.count_documents({"certyo_status": "pending"}) == 19
    assert "certyo_status" not in products.find_one({"_id": edited})
    # The newer version is shipped by the next run of the hour.
    assert pipeline.materialize(pk(15)).success
    newest = products.find_one({"_id": edited})
    assert newest["certyo_status"] == "pending"
    assert newest["certyo_version"] == int(
        (hour(15, 59) - datetime(1970, 1, 1)).total_seconds() * 1000
    )


def test_a_window_scan_resumes_after_its_last_key_across_id_types_when_the_cursor_dies(
    pipeline, fail_point
):
    """A connection lost mid-scan: the server closes it on three getMores in a row (a getMore
    is never retried by the driver); the scan reopens after the last key it handed out, even
    inside a run of equal timestamps with mixed _id types."""
    from certyo_dagster.capture.polling import iter_window_batches

    products = pipeline.db["products"]
    tie = hour(16, 30)
    ids = [ObjectId() for _ in range(6)] + ["a", "b", 1, 2, {"k": 1}]
    products.insert_many([{"_id": i, "updatedAt": tie} for i in ids])
    products.insert_one({"_id": "later", "updatedAt": hour(16, 45)})
    watched = pipeline.resources["mongo"].get_collection("products")  # the pipeline's client
    fail_point.arm({"times": 3}, commands=["getMore"], closeConnection=True)

    seen = [
        d["_id"]
        for batch in iter_window_batches(watched, pipeline.spec(), hour(16), hour(17), batch_size=2)
        for d in batch
    ]

    assert sorted(map(repr, seen)) == sorted(map(repr, ids + ["later"]))
    assert len(seen) == len(ids) + 1
    # All three faults fired: the fail point is spent, so a getMore now goes through.
    assert len(list(watched.find({}).batch_size(1))) == len(ids) + 1


def test_pitfall_unbounded_memory__the_ingestor_reads_at_most_in_flight_plus_one_batches_ahead(
    pipeline, monkeypatch
):
    """However slow Certyo is, extraction never runs ahead of shipping by more than
    `max_in_flight + 1` batches, so memory does not grow with the partition."""
    import threading

    import certyo_dagster.ship.ingest as ingest_module

    products = pipeline.db["products"]
    products.insert_many([_product(i, hour(17, i % 60, i // 60)) for i in range(2_000)])
    real = pipeline.resources["certyo"].get_client()
    state = {"read": 0, "done": 0, "max_ahead": 0}
    lock = threading.Lock()
    real_batches = ingest_module.iter_window_batches

    def counting_batches(*args, **kwargs):
        for batch in real_batches(*args, **kwargs):
            with lock:
                state["read"] += 1
                state["max_ahead"] = max(state["max_ahead"], state["read"] - state["done"])
            yield batch

    class SlowCertyo:
        def ingest_record(self, record):
            return real.ingest_record(record)

        def post_bulk_body(self, body, count):
            time.sleep(0.05)
            response = real.post_bulk_body(body, count)
            with lock:
                state["done"] += 1
            return response

    monkeypatch.setattr(ingest_module, "iter_window_batches", counting_batches)
    report = _ingestor(
        pipeline,
        SlowCertyo(),
        batch_size=50,
        max_in_flight=3,
    ).run(hour(17), hour(18))

    assert report.accepted == 2_000 and report.batches == 40
    assert state["max_ahead"] <= 3 + 1


def test_the_keyset_index_is_created_unless_configured_off(pipeline, mongo, sandbox):
    pipeline.db["products"].insert_one(_product(1, hour(18, 1)))
    assert pipeline.materialize(pk(18), config={"create_indexes": False}).success
    assert "certyo_updatedAt_id" not in pipeline.db["products"].index_information()

    assert pipeline.materialize(pk(18)).success
    indexes = pipeline.db["products"].index_information()
    assert indexes["certyo_updatedAt_id"]["key"] == [("updatedAt", 1), ("_id", 1)]


def test_an_existing_index_on_the_same_keys_is_reused_and_a_refusal_only_warns(pipeline):
    from pymongo.errors import OperationFailure

    from certyo_dagster.source.mongo import ensure_index

    products = pipeline.db["products"]
    products.create_index([("updatedAt", 1), ("_id", 1)])  # the DBA's, default name
    products.insert_one(_product(1, hour(18, 2)))
    assert pipeline.materialize(pk(18)).success
    assert "certyo_updatedAt_id" not in products.index_information()

    class NoPrivilege:
        def index_information(self):
            return {"_id_": {"key": [("_id", 1)]}}

        def create_index(self, keys, name):
            raise OperationFailure("not authorized on shop", code=13)

    warning = ensure_index(NoPrivilege(), [("certyo_status", 1), ("_id", 1)], "certyo_status_id")
    assert "certyo_status_id" in warning and "not authorized" in warning

    class Broken(NoPrivilege):
        def create_index(self, keys, name):
            raise OperationFailure("disk full", code=14031)

    with pytest.raises(OperationFailure):
        ensure_index(Broken(), [("certyo_status", 1)], "certyo_status")


def test_documents_without_a_timestamp_are_counted_and_flagged(pipeline):
    products = pipeline.db["products"]
    products.insert_many([_product(i, hour(19, i)) for i in range(3)])
    products.insert_many([{"_id": f"untimed-{i}", "name": "no updatedAt"} for i in range(2)])
    products.insert_one({"_id": "iso-string", "updatedAt": "2026-11-01T19:30:00Z"})
    products.insert_one({"_id": "epoch-ms", "updatedAt": 1_793_560_200_000})

    result = pipeline.materialize(pk(19))

    assert result.success
    check = _check(result, "all_documents_timestamped")
    assert not check.passed and check.metadata["untimestamped_documents"].value == 4
    assert _metadata(result, "changed_documents")["untimestamped_documents"] == 4


def test_long_partitions_log_progress_every_n_batches(pipeline):
    pipeline.db["products"].insert_many(
        [_product(i, hour(20, i % 60, i // 60)) for i in range(250)]
    )
    lines: list[str] = []

    _ingestor(
        pipeline,
        pipeline.resources["certyo"].get_client(),
        batch_size=50,
        progress_every=2,
        log=lines.append,
    ).run(hour(20), hour(21))

    assert len(lines) == 2  # after batches 2 and 4 of 5
    assert lines[0].startswith("products: 100 documents read")


def test_a_dead_letter_is_resolved_by_a_newer_version_even_after_a_whole_document_replace(
    pipeline,
):
    products = pipeline.db["products"]
    products.insert_one({"_id": "big", "updatedAt": hour(21, 5), "blob": "x" * 2_000_000})
    assert pipeline.materialize(pk(21)).success
    assert pipeline.db["_certyo_dead_letters"].find_one()["resolvedAt"] is None

    # The application replaces the whole document: our certyo_* fields are gone with it.
    products.replace_one({"_id": "big"}, {"_id": "big", "updatedAt": hour(21, 9), "blob": "x"})
    result = pipeline.materialize(pk(21))

    assert result.success
    assert pipeline.db["_certyo_dead_letters"].find_one()["resolvedAt"] is not None
    assert _check(result, "no_dead_letters").passed
    assert products.find_one({"_id": "big"})["certyo_status"] == "pending"


def test_an_array_timestamp_holding_a_date_in_range_is_a_dead_letter_not_a_crash(pipeline):
    """MongoDB's range query also matches an array that holds a date in the window."""
    products = pipeline.db["products"]
    products.insert_one(_product(1, hour(22, 1)))
    products.insert_one({"_id": "array-ts", "updatedAt": [hour(22, 2), hour(22, 3)]})
    products.insert_one(_product(2, hour(22, 4)))

    tick = pipeline.tick()
    assert [r.partition_key for r in tick.run_requests] == [pk(22)]
    assert pipeline.materialize(pk(22)).success

    letter = pipeline.db["_certyo_dead_letters"].find_one({"documentId": "array-ts"})
    assert letter["reason"] == "bad_timestamp"
    assert len(pipeline.certyo_records(collection="products")) == 2
    assert not pipeline.tick(cursor=tick.cursor).run_requests


def test_a_rejected_new_version_does_not_keep_the_previous_versions_hash(pipeline):
    products = pipeline.db["products"]
    doc = _product(1, hour(23, 1))
    products.insert_one(doc)
    assert pipeline.materialize(pk(23)).success
    assert products.find_one({"_id": doc["_id"]})["certyo_record_hash"]

    products.update_one(
        {"_id": doc["_id"]}, {"$set": {"blob": "x" * 2_000_000, "updatedAt": hour(23, 30)}}
    )
    assert pipeline.materialize(pk(23)).success

    stored = products.find_one({"_id": doc["_id"]})
    assert stored["certyo_status"] == "rejected"
    assert stored["certyo_failure_reason"].startswith("too_large")
    assert "certyo_record_hash" not in stored and "certyo_ingested_at" not in stored


def test_a_gateway_that_takes_smaller_bodies_than_ours_gets_halved_requests(pipeline):
    """A 413 without per-record errors: the batch is split until each part fits."""
    pipeline.db["products"].insert_many(
        [_product(i, hour(23, i % 60, i // 60)) for i in range(200)]
    )
    pipeline.sandbox.script_faults([{"status": 413, "times": 3, "path": "/api/v1/records/bulk"}])

    result = pipeline.materialize(pk(23))

    assert result.success
    assert len(pipeline.certyo_records(collection="products")) == 200
    assert pipeline.sandbox.stats()["requests_by_status"]["413"] == 3
    assert pipeline.db["_certyo_dead_letters"].count_documents({}) == 0
