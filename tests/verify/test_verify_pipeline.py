"""Verification end to end: MongoDB → ingest job → certyo-sandbox over HTTP → verify job.

Each defect of the reference verification worker (shared/reference/pitfalls.md) has a test:
it picked up never-ingested documents, handled 100 documents sequentially, and marked an
edited document anchored with a stale hash.
"""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import dagster as dg
from bson import Decimal128, ObjectId
from fixtures.pipeline import hour, make_pipeline, pk

from certyo_dagster.prove.hashing import record_hash
from certyo_dagster.sanitize.documents import sanitize_document, version_ms
from certyo_dagster.settings import CollectionSpec
from certyo_dagster.verify.pending import PendingVerifier


def _product(i: int, ts: datetime, **extra) -> dict:
    return {"_id": ObjectId(), "sku": f"SKU-{i:06d}", "price": Decimal128("9.90"), "updatedAt": ts,
            **extra}  # fmt: skip


def _seed_and_ingest(pipeline, count: int, n_hour: int = 2) -> list[dict]:
    docs = [_product(i, hour(n_hour, minute=i % 60, ms=i)) for i in range(count)]
    pipeline.db["products"].insert_many(docs)
    assert pipeline.materialize(pk(n_hour)).success
    return docs


def _op(pipeline, asset: str) -> str:
    """The op that materializes `asset` of the products collection in the test's database."""
    return f"{pipeline.spec().database}__products__{asset}"


def _verify(pipeline, raise_on_error: bool = True, **config) -> dg.ExecuteInProcessResult:
    run_config = (
        {"ops": {_op(pipeline, "anchoring_status"): {"config": config}}} if config else None
    )
    return pipeline.run_job("verify_products", run_config, raise_on_error=raise_on_error)


def _metadata(result: dg.ExecuteInProcessResult) -> dict:
    (materialization,) = [
        event.materialization
        for event in result.get_asset_materialization_events()
        if event.materialization.asset_key.path[-1] == "anchoring_status"
    ]
    return {k: v.value for k, v in materialization.metadata.items()}


def _checks(result: dg.ExecuteInProcessResult) -> dict[str, dg.AssetCheckEvaluation]:
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def _verify_calls(sandbox) -> int:
    # Verify answers 200 or 404; ingestion answers 202.
    by_status = sandbox.stats()["requests_by_status"]
    return by_status.get("200", 0) + by_status.get("404", 0)


def test_ingest_flush_verify_anchors_every_document(pipeline):
    docs = _seed_and_ingest(pipeline, 30)
    untouched = _product(999, hour(5))  # never ingested: the reference would have picked it
    pipeline.db["products"].insert_one(untouched)
    pipeline.sandbox.flush()
    calls_before = _verify_calls(pipeline.sandbox)

    result = _verify(pipeline)

    assert result.success
    assert _verify_calls(pipeline.sandbox) - calls_before == 30
    for doc in docs:
        stored = pipeline.db["products"].find_one({"_id": doc["_id"]})
        assert stored["certyo_status"] == "anchored"
        assert stored["certyo_tx_hash"].startswith("0x")
        assert len(stored["certyo_merkle_root"]) == 64
        assert isinstance(stored["certyo_block_number"], int)
        assert stored["certyo_ipfs_cid"]
        assert isinstance(stored["certyo_verified_at"], datetime)
        assert stored["certyo_record_hash"] == record_hash(sanitize_document(doc))
        assert stored["updatedAt"] == doc["updatedAt"]  # the timestamp is never written
        assert "certyo_failure_reason" not in stored
    assert "certyo_status" not in pipeline.db["products"].find_one({"_id": untouched["_id"]})
    checks = _checks(result)
    assert checks["no_failed_documents"].passed
    assert checks["oldest_pending_within_deadline"].passed


def test_write_back_does_not_retrigger_ingestion(pipeline):
    _seed_and_ingest(pipeline, 5)
    pipeline.sandbox.flush()
    _verify(pipeline)
    tick = pipeline.tick()
    assert not tick.run_requests


def test_report_counts_match_the_collection(pipeline):
    _seed_and_ingest(pipeline, 12)
    pipeline.sandbox.flush()
    _seed_and_ingest(pipeline, 4, n_hour=3)  # accepted after the flush: still pending
    products = pipeline.db["products"]
    products.insert_one(_product(500, hour(6)))  # not ingested
    fabricated = _product(501, hour(1))
    fabricated.update(
        certyo_status="pending",
        certyo_record_hash=record_hash(sanitize_document(fabricated)),
        certyo_version=version_ms(fabricated["updatedAt"]),
        certyo_ingested_at=datetime.now(timezone.utc).replace(tzinfo=None),
    )
    products.insert_one(fabricated)

    metadata = _metadata(_verify(pipeline))

    assert metadata["documents"] == products.count_documents({}) == 18
    for status, key in [
        ("anchored", "status_anchored"),
        ("pending", "status_pending"),
        ("failed", "status_failed"),
    ]:
        assert metadata[key] == products.count_documents({"certyo_status": status}), status
    assert (metadata["status_anchored"], metadata["status_pending"]) == (12, 4)
    assert metadata["status_failed"] == 1
    assert metadata["status_not_ingested"] == 1
    assert metadata["run_anchored"] == 12
    assert metadata["latency_p50_seconds"] is not None
    assert metadata["oldest_pending_age_seconds"] is not None
    table = metadata["report"]
    assert "| anchored" in table and "| pending" in table and "p95" in table


def test_a_document_edited_between_ingestion_and_verification_is_not_anchored(pipeline):
    docs = _seed_and_ingest(pipeline, 3)
    pipeline.sandbox.flush()
    edited = docs[1]
    products = pipeline.db["products"]
    products.update_one(
        {"_id": edited["_id"]},
        {"$set": {"price": Decimal128("1.00"), "updatedAt": hour(2, minute=59)}},
    )

    result = _verify(pipeline)

    stored = products.find_one({"_id": edited["_id"]})
    assert stored["certyo_status"] == "pending"
    assert "certyo_tx_hash" not in stored
    assert _metadata(result)["run_edited_since_ingestion"] == 1
    # The pipeline re-ingests the new version; it is then anchored with its new hash.
    assert pipeline.materialize(pk(2)).success
    pipeline.sandbox.flush()
    _verify(pipeline)
    stored = products.find_one({"_id": edited["_id"]})
    assert stored["certyo_status"] == "anchored"
    assert stored["certyo_record_hash"] == record_hash(sanitize_document(stored))


def test_a_tampered_proof_fails_the_document_with_a_reason(pipeline):
    docs = _seed_and_ingest(pipeline, 1)
    pipeline.sandbox.flush()
    pipeline.sandbox.script_faults([{"action": "tamper_proof"}])

    result = _verify(pipeline)

    stored = pipeline.db["products"].find_one({"_id": docs[0]["_id"]})
    assert stored["certyo_status"] == "failed"
    assert stored["certyo_failure_reason"].startswith("proof_mismatch:")
    assert "certyo_tx_hash" not in stored
    check = _checks(result)["no_failed_documents"]
    assert not check.passed
    assert check.severity == dg.AssetCheckSeverity.ERROR


def test_a_payload_changed_without_a_timestamp_bump_fails(pipeline):
    docs = _seed_and_ingest(pipeline, 2)
    pipeline.sandbox.flush()
    products = pipeline.db["products"]
    products.update_one({"_id": docs[0]["_id"]}, {"$set": {"price": Decimal128("0.01")}})

    _verify(pipeline)

    stored = products.find_one({"_id": docs[0]["_id"]})
    assert stored["certyo_status"] == "failed"
    assert stored["certyo_failure_reason"].startswith("payload_changed:")
    assert products.find_one({"_id": docs[1]["_id"]})["certyo_status"] == "anchored"


def test_a_pending_document_past_the_deadline_fails(pipeline):
    docs = _seed_and_ingest(pipeline, 2)  # never flushed: Certyo has not anchored them
    products = pipeline.db["products"]
    long_ago = datetime.now(timezone.utc).replace(tzinfo=None) - timedelta(hours=25)
    products.update_one({"_id": docs[0]["_id"]}, {"$set": {"certyo_ingested_at": long_ago}})

    result = _verify(pipeline)

    old = products.find_one({"_id": docs[0]["_id"]})
    assert old["certyo_status"] == "failed"
    assert old["certyo_failure_reason"].startswith("not_anchored_in_time:")
    assert products.find_one({"_id": docs[1]["_id"]})["certyo_status"] == "pending"
    check = _checks(result)["no_failed_documents"]
    assert not check.passed
    assert check.severity == dg.AssetCheckSeverity.WARN


def test_the_oldest_pending_check_fails_past_the_deadline(pipeline):
    docs = _seed_and_ingest(pipeline, 1)
    products = pipeline.db["products"]
    two_hours_ago = datetime.now(timezone.utc).replace(tzinfo=None) - timedelta(hours=2)
    products.update_one({"_id": docs[0]["_id"]}, {"$set": {"certyo_ingested_at": two_hours_ago}})
    # A newer edit is waiting for re-ingestion, so verification leaves the document pending.
    products.update_one({"_id": docs[0]["_id"]}, {"$set": {"updatedAt": hour(2, minute=59)}})

    result = _verify(pipeline, deadline_hours=1.0)

    check = _checks(result)["oldest_pending_within_deadline"]
    assert not check.passed
    assert check.metadata["oldest_pending_age_seconds"].value >= 7200


def test_unknown_to_certyo_fails_with_a_recoverable_reason(pipeline):
    doc = _product(1, hour(2))
    doc.update(
        certyo_status="pending",
        certyo_record_hash=record_hash(sanitize_document(doc)),
        certyo_version=version_ms(doc["updatedAt"]),
        certyo_ingested_at=datetime.now(timezone.utc).replace(tzinfo=None),
    )
    products = pipeline.db["products"]
    products.insert_one(doc)

    _verify(pipeline)

    stored = products.find_one({"_id": doc["_id"]})
    assert stored["certyo_status"] == "failed"
    assert stored["certyo_failure_reason"].startswith("unknown_to_certyo")
    # The README's recovery: a forced re-run of the partition re-sends it ...
    assert pipeline.materialize(pk(2), config={"force": True}).success
    assert products.find_one({"_id": doc["_id"]})["certyo_status"] == "pending"
    pipeline.sandbox.flush()
    _verify(pipeline)
    assert products.find_one({"_id": doc["_id"]})["certyo_status"] == "anchored"


def test_five_hundred_pending_documents_are_verified_in_one_run_concurrently(pipeline):
    docs = _seed_and_ingest(pipeline, 520)
    pipeline.sandbox.flush()
    calls_before = _verify_calls(pipeline.sandbox)

    metadata = _metadata(_verify(pipeline, max_in_flight=8, page_size=100))

    assert _verify_calls(pipeline.sandbox) - calls_before == len(docs)
    assert metadata["run_certyo_requests"] == len(docs)
    assert metadata["run_anchored"] == len(docs)
    assert pipeline.db["products"].count_documents({"certyo_status": "anchored"}) == len(docs)


class _RendezvousClient:
    """Holds the first two verify calls until both are in flight: proof of concurrency that
    does not depend on timing (a sequential verifier breaks the barrier)."""

    def __init__(self, client):
        self.client = client
        self.barrier = threading.Barrier(2, timeout=10)
        self.calls = 0
        self._lock = threading.Lock()

    def verify_record(self, *args, **kwargs):
        with self._lock:
            self.calls += 1
            first_two = self.calls <= 2
        if first_two:
            self.barrier.wait()
        return self.client.verify_record(*args, **kwargs)


def test_verify_calls_overlap(pipeline):
    _seed_and_ingest(pipeline, 40)
    pipeline.sandbox.flush()
    client = _RendezvousClient(pipeline.resources["certyo"].get_client())
    verifier = PendingVerifier(
        collection=pipeline.db["products"],
        spec=CollectionSpec(pipeline.db.name, "products"),
        client=client,
        max_in_flight=4,
    )
    report = verifier.run()
    assert client.calls == 40
    assert report.anchored == 40


def test_the_tamper_audit_finds_exactly_the_documents_edited_behind_the_pipelines_back(
    pipeline,
):
    docs = _seed_and_ingest(pipeline, 20)
    pipeline.sandbox.flush()
    _verify(pipeline)
    products = pipeline.db["products"]
    behind_back = [docs[2], docs[11]]
    for doc in behind_back:
        products.update_one({"_id": doc["_id"]}, {"$set": {"sku": "forged"}})
    # Edited the normal way and re-ingested: pending with its new hash, not a mismatch.
    products.update_one(
        {"_id": docs[5]["_id"]}, {"$set": {"sku": "renamed", "updatedAt": hour(2, minute=59)}}
    )
    assert pipeline.materialize(pk(2)).success
    # Edited the normal way, not yet re-ingested: still anchored with the old version.
    products.update_one(
        {"_id": docs[7]["_id"]}, {"$set": {"sku": "renamed", "updatedAt": hour(2, minute=58)}}
    )

    result = pipeline.run_job("tamper_audit_products")

    (materialization,) = result.asset_materializations_for_node(_op(pipeline, "tamper_audit"))
    metadata = materialization.metadata
    assert sorted(metadata["mismatched_record_ids"].value) == sorted(
        str(d["_id"]) for d in behind_back
    )
    assert metadata["mismatches"].value == 2
    assert metadata["audited_documents"].value == 19  # docs[5] is pending again
    assert metadata["awaiting_reingestion"].value == 1
    check = _checks(result)["no_tampered_documents"]
    assert not check.passed
    assert check.severity == dg.AssetCheckSeverity.ERROR


def test_the_tamper_audit_passes_on_an_untouched_collection(pipeline):
    _seed_and_ingest(pipeline, 5)
    pipeline.sandbox.flush()
    _verify(pipeline)
    result = pipeline.run_job("tamper_audit_products")
    check = _checks(result)["no_tampered_documents"]
    assert check.passed
    assert check.metadata["audited_documents"].value == 5


# -- schedules ----------------------------------------------------------------------------------


def test_verify_schedule_runs_every_two_minutes_when_something_is_pending(pipeline):
    schedule = pipeline.defs.resolve_schedule_def("verify_products_schedule")
    assert schedule.cron_schedule == "*/2 * * * *"
    assert schedule.execution_timezone == "UTC"
    assert schedule.job_name == "verify_products"
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED  # not demo mode

    when = datetime(2026, 11, 1, 12, 2, tzinfo=timezone.utc)
    with dg.instance_for_test() as instance:
        with dg.build_schedule_context(
            scheduled_execution_time=when, resources=pipeline.resources, instance=instance
        ) as context:
            assert "no pending documents" in schedule.evaluate_tick(context).skip_message
        _seed_and_ingest(pipeline, 1)
        with dg.build_schedule_context(
            scheduled_execution_time=when, resources=pipeline.resources, instance=instance
        ) as context:
            (request,) = schedule.evaluate_tick(context).run_requests
    assert request.run_key == f"verify:{when.isoformat()}"
    assert request.tags["certyo/trigger"] == "schedule"


def test_schedules_follow_the_settings(mongo, sandbox):
    pipeline = make_pipeline(
        mongo,
        sandbox,
        verify_cron="*/5 * * * *",
        tamper_audit_cron="0 4 * * *",
        demo_mode=True,
        verify_max_in_flight=3,
    )
    verify = pipeline.defs.resolve_schedule_def("verify_products_schedule")
    audit = pipeline.defs.resolve_schedule_def("tamper_audit_products_schedule")
    assert verify.cron_schedule == "*/5 * * * *"
    assert audit.cron_schedule == "0 4 * * *"
    assert audit.job_name == "tamper_audit_products"
    assert verify.default_status == dg.DefaultScheduleStatus.RUNNING
    job = pipeline.defs.resolve_job_def("verify_products")
    op_config = job.run_config["ops"][_op(pipeline, "anchoring_status")]["config"]
    assert op_config == {"max_documents": 10_000, "max_in_flight": 3, "deadline_hours": 24.0}


def test_verify_schedule_skips_while_a_verify_run_is_in_progress(pipeline):
    _seed_and_ingest(pipeline, 1)
    schedule = pipeline.defs.resolve_schedule_def("verify_products_schedule")
    job = pipeline.defs.resolve_job_def("verify_products")
    with dg.instance_for_test() as instance:
        run = instance.create_run_for_job(job, status=dg.DagsterRunStatus.STARTED)
        with dg.build_schedule_context(
            scheduled_execution_time=datetime(2026, 11, 1, 12, 2, tzinfo=timezone.utc),
            resources=pipeline.resources,
            instance=instance,
        ) as context:
            result = schedule.evaluate_tick(context)
    assert not result.run_requests
    assert run.run_id in result.skip_message


def test_certyo_unavailable_fails_the_run_but_keeps_documents_pending(pipeline):
    docs = _seed_and_ingest(pipeline, 2)
    pipeline.sandbox.flush()
    pipeline.sandbox.script_faults([{"path": "/api/v1/verify/record", "status": 503, "times": 50}])

    result = _verify(pipeline, raise_on_error=False)

    assert not result.success
    products = pipeline.db["products"]
    assert products.count_documents({"certyo_status": "pending"}) == len(docs)
    assert _metadata(result)["run_verify_errors"] == len(docs)  # the report still lands
    failure = result.failure_data_for_node(_op(pipeline, "anchoring_status"))
    assert "retried by the next run" in failure.user_failure_data.description
    assert "cty_sandbox" not in failure.user_failure_data.description  # no API key

    pipeline.sandbox.clear_faults()
    assert _verify(pipeline).success
    assert products.count_documents({"certyo_status": "anchored"}) == len(docs)
