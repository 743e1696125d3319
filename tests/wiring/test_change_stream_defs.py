"""Change-stream capture through Dagster: names, the job and its checks, the sensor, and
verification and the tamper audit on documents captured this way. SecantusDB and the sandbox
over the wire."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import dagster as dg
import pymongo
import pytest
from fixtures.pipeline import make_pipeline

from certyo_dagster.capture.change_stream import GAPS_COLLECTION, read_position, save_position
from certyo_dagster.settings import CollectionSpec, PipelineSettings
from certyo_dagster.wiring import build_definitions

REPO = Path(__file__).resolve().parents[2]
JOB = "stream_items"
OP = "stream_items_changes"


@pytest.fixture
def streamed(mongo, sandbox):
    spec = CollectionSpec(mongo.database, "items", capture="change_stream")
    return make_pipeline(mongo, sandbox, collections=[spec])


def _run(pipeline, raise_on_error=True, **config):
    config.setdefault("max_seconds", 30.0)
    return pipeline.run_job(
        JOB, run_config={"ops": {OP: {"config": config}}}, raise_on_error=raise_on_error
    )


def _tick(pipeline, cursor=None):
    sensor = pipeline.defs.resolve_sensor_def("items_change_stream_sensor")
    with dg.build_sensor_context(
        instance=pipeline.instance,
        cursor=cursor,
        resources=pipeline.resources,
        definitions=pipeline.defs,
    ) as context:
        return sensor.evaluate_tick(context)


def _check(result, name="change_stream_position_valid"):
    (evaluation,) = [e for e in result.get_asset_check_evaluations() if e.check_name == name]
    return evaluation


def test_a_change_stream_collection_has_the_stream_names_and_no_polling_ones():
    settings = PipelineSettings(
        collections=[
            CollectionSpec("shop", "items", capture="change_stream"),
            CollectionSpec("shop", "orders"),
        ]
    )
    defs = build_definitions(settings)
    jobs = {j.name for j in defs.resolve_all_job_defs()}
    assert {"stream_items", "verify_items", "tamper_audit_items", "ingest_orders"} <= jobs
    assert "ingest_items" not in jobs and "stream_orders" not in jobs
    sensors = {s.name for s in defs.sensors}
    assert "items_change_stream_sensor" in sensors and "items_change_sensor" not in sensors
    assert "ingest_items_hourly" not in {s.name for s in defs.schedules}
    keys = defs.resolve_asset_graph().get_all_asset_keys()
    assert dg.AssetKey(["shop", "items", "change_events"]) in keys
    assert dg.AssetKey(["shop", "items", "ingestion_receipts"]) in keys
    checks = defs.resolve_asset_graph().asset_check_keys
    assert (
        dg.AssetCheckKey(
            dg.AssetKey(["shop", "items", "change_events"]), "change_stream_position_valid"
        )
        in checks
    )
    job = defs.resolve_job_def("stream_items")
    config = (
        job.run_config_schema.config_type.fields["ops"]
        .config_type.fields["stream_items_changes"]
        .config_type.fields["config"]
        .config_type.fields
    )
    assert {"max_events", "max_seconds", "full_document", "resnapshot"} <= set(config)
    assert config["max_events"].default_value == 10_000
    assert config["max_seconds"].default_value == 60
    assert config["full_document"].default_value == "updateLookup"
    assert config["resnapshot"].default_value is False


def test_dagster_yaml_keeps_one_stream_run_per_collection(tmp_path):
    shutil.copy(REPO / "dagster.yaml", tmp_path / "dagster.yaml")
    instance = dg.DagsterInstance.from_config(str(tmp_path))
    limits = instance.get_concurrency_config().run_queue_config.tag_concurrency_limits
    assert {
        "key": "certyo/stream",
        "value": {"applyLimitPerUniqueValue": True},
        "limit": 1,
    } in limits
    job = build_definitions(
        PipelineSettings(collections=[CollectionSpec("shop", "items", capture="change_stream")])
    ).resolve_job_def("stream_items")
    assert job.tags["certyo/stream"] == "items"


def test_stream_run_then_verify_and_tamper_audit_work_unchanged(streamed):
    db = streamed.db
    db.items.insert_many([{"_id": i, "name": f"n{i}"} for i in range(12)])
    first = _run(streamed)
    meta = first.asset_materializations_for_node(OP)[0].metadata
    assert meta["snapshot_documents_read"].value == 12
    assert _check(first).passed
    db.items.insert_one({"_id": "new"})
    db.items.update_one({"_id": 1}, {"$set": {"name": "renamed"}})
    db.items.delete_one({"_id": 2})
    second = _run(streamed)
    meta = second.asset_materializations_for_node(OP)[0].metadata
    assert meta["by_operation_type"].value == {"delete": 1, "insert": 1, "update": 1}
    assert meta["events"].value == 3 and meta["cluster_time_min"].value
    assert "resume token sha256:" in meta["saved_position"].value
    streamed.sandbox.flush()
    assert streamed.run_job("verify_items").success
    assert db.items.count_documents({"certyo_status": "anchored"}) == 12
    audit = streamed.run_job("tamper_audit_items")
    assert _check(audit, "no_tampered_documents").passed
    # An edit waits for its change event: verification leaves it alone, never fails it.
    db.items.update_one({"_id": 3}, {"$set": {"name": "edited"}})
    db.items.update_one(
        {"_id": 4, "certyo_status": "anchored"}, {"$set": {"certyo_status": "pending"}}
    )
    db.items.update_one({"_id": 4}, {"$set": {"name": "edited too"}})
    verify = streamed.run_job("verify_items")
    assert verify.success and db.items.count_documents({"certyo_status": "failed"}) == 0
    _run(streamed)
    streamed.sandbox.flush()
    streamed.run_job("verify_items")
    assert db.items.find_one({"_id": 4})["certyo_status"] == "anchored"
    assert db.items.find_one({"_id": 3})["certyo_status"] == "anchored"


def test_tamper_audit_flags_a_change_the_stream_never_delivered(streamed):
    db = streamed.db
    db.items.insert_many([{"_id": i} for i in range(3)])
    _run(streamed)
    streamed.sandbox.flush()
    streamed.run_job("verify_items")
    spec = streamed.spec("items")
    db.items.update_one({"_id": 1}, {"$set": {"secret": "edit"}})
    # The edit's event is skipped, as a restored backup or a lost history would skip it.
    position = read_position(db, spec)
    with db.items.watch(resume_after=position.resume_token, max_await_time_ms=200) as stream:
        while stream.try_next() is not None:
            pass
        position.resume_token = dict(stream.resume_token)
    save_position(db, spec, position)
    audit = streamed.run_job("tamper_audit_items")
    evaluation = _check(audit, "no_tampered_documents")
    assert not evaluation.passed
    assert evaluation.metadata["mismatched_record_ids"].value == ["1"]


def test_sensor_requests_runs_by_position_and_saves_the_heartbeat(streamed):
    db = streamed.db
    first = _tick(streamed)
    (request,) = first.run_requests
    assert request.run_key == "stream_items:start"
    _run(streamed)
    quiet = _tick(streamed)
    assert not quiet.run_requests and "no change events past" in quiet.skip_message
    assert quiet.cursor and "resumeToken" in quiet.cursor  # the mirror of _certyo_cursors
    db.items.insert_one({"_id": 1})
    waiting = _tick(streamed)
    (request,) = waiting.run_requests
    assert request.run_key.startswith("stream_items:") and request.run_key != "stream_items:start"
    assert request.tags["certyo/position"] in request.run_key
    assert _tick(streamed).run_requests[0].run_key == request.run_key  # the same position
    streamed.instance.add_run(
        dg.DagsterRun(
            job_name=JOB,
            run_id="0a1b2c3d-0000-4000-8000-000000000009",
            status=dg.DagsterRunStatus.STARTED,
        )
    )
    busy = _tick(streamed)
    assert not busy.run_requests and "is active" in busy.skip_message
    failed = _run(streamed, raise_on_error=False)
    assert not failed.success  # a second run never moves the position alongside another


def test_with_a_run_queue_the_next_run_waits_behind_the_active_one(streamed, tmp_path):
    """A busy collection's next run is queued while one runs, so it starts when that one ends
    instead of at the first tick after it; never more than one waits."""
    _run(streamed)  # the saved position lives in MongoDB, not in the instance
    streamed.db.items.insert_one({"_id": 1})
    queued = {"run_coordinator": {"module": "dagster", "class": "QueuedRunCoordinator"}}
    with dg.instance_for_test(overrides=queued, temp_dir=str(tmp_path)) as instance:
        pipeline = dataclasses.replace(streamed, instance=instance)
        active = dg.DagsterRun(
            job_name=JOB,
            run_id="0a1b2c3d-0000-4000-8000-00000000000a",
            status=dg.DagsterRunStatus.STARTED,
        )
        instance.add_run(active)
        (request,) = _tick(pipeline).run_requests
        assert request.tags["certyo/position"] in request.run_key
        instance.add_run(
            dg.DagsterRun(
                job_name=JOB,
                run_id="0a1b2c3d-0000-4000-8000-00000000000b",
                status=dg.DagsterRunStatus.NOT_STARTED,  # submitted, not yet started
            )
        )
        waiting = _tick(pipeline)
        assert not waiting.run_requests and "waiting to start" in waiting.skip_message
    # The run that starts is not refused because the next one already waits behind it.
    streamed.instance.add_run(
        dg.DagsterRun(
            job_name=JOB,
            run_id="0a1b2c3d-0000-4000-8000-00000000000c",
            status=dg.DagsterRunStatus.NOT_STARTED,
        )
    )
    assert _run(streamed).success


def test_a_fresh_dagster_instance_resumes_from_certyo_cursors(streamed, mongo, sandbox):
    streamed.db.items.insert_many([{"_id": i} for i in range(5)])
    _run(streamed)
    streamed.db.items.insert_one({"_id": "later"})
    spec = streamed.spec("items")
    fresh = make_pipeline(mongo, sandbox, collections=[spec])
    assert fresh.instance is not streamed.instance
    result = _run(fresh)
    meta = result.asset_materializations_for_node(OP)[0].metadata
    assert meta["snapshot_documents_read"].value == 0 and meta["events"].value == 1
    assert len(fresh.certyo_records(collection="items")) == 6


def test_a_gap_turns_the_check_red_and_a_resnapshot_resolves_it(streamed, mongo):
    db = streamed.db
    db.items.insert_many([{"_id": i} for i in range(3)])
    _run(streamed)
    db.items.insert_one({"_id": "x"})
    with pymongo.MongoClient(mongo.uri) as admin:
        admin.admin.command(
            "configureFailPoint",
            "failCommand",
            mode={"times": 1},
            data={"failCommands": ["aggregate"], "errorCode": 286},
        )
        try:
            failed = _run(streamed, raise_on_error=False)
        finally:
            admin.admin.command("configureFailPoint", "failCommand", mode="off")
    assert not failed.success
    evaluation = _check(failed)
    assert not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.ERROR
    assert evaluation.metadata["reason"].value == "history_lost"
    failure = failed.failure_data_for_node(OP).error.message
    assert "items" in failure and "Saved position: resume token sha256:" in failure
    assert db[GAPS_COLLECTION].count_documents({"resolvedAt": None}) == 1
    sensor = _tick(streamed)
    assert sensor.run_requests  # the gap is for the run to report
    recovered = _run(streamed, resnapshot=True)
    assert _check(recovered).passed
    assert db[GAPS_COLLECTION].count_documents({"resolvedAt": None}) == 0


def test_sensor_retries_a_failed_position_but_never_loops_on_a_gap(streamed, mongo):
    streamed.db.items.insert_one({"_id": 0})
    _run(streamed)
    streamed.db.items.insert_one({"_id": 1})
    (request,) = _tick(streamed).run_requests
    where = request.tags["certyo/position"]
    streamed.instance.add_run(
        dg.DagsterRun(
            job_name=JOB,
            run_id="0a1b2c3d-0000-4000-8000-00000000000a",
            status=dg.DagsterRunStatus.FAILURE,
            tags={"certyo/position": where},
        )
    )
    (retry,) = _tick(streamed).run_requests
    assert retry.run_key == f"{request.run_key}:after-0a1b2c3d"
    with pymongo.MongoClient(mongo.uri) as admin:
        admin.admin.command(
            "configureFailPoint",
            "failCommand",
            mode={"times": 1},
            data={"failCommands": ["aggregate"], "errorCode": 286},
        )
        try:
            gap = _tick(streamed)
        finally:
            admin.admin.command("configureFailPoint", "failCommand", mode="off")
    assert not gap.run_requests and "resnapshot: true" in gap.skip_message
