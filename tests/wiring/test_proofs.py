"""`<db>/<c>/proof_bundles` and the hourly `certyo_records_match` check, on SecantusDB, the
sandbox over HTTP and a local chain."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest
from bson import ObjectId
from fixtures.pipeline import hour, make_pipeline, pk

from certyo_dagster.proof_cli import run_verify
from certyo_dagster.sanitize.documents import version_ms
from certyo_dagster.verify.reconcile import compare_hour
from certyo_dagster.wiring.proofs import proof_keys


@pytest.fixture
def pipeline(mongo, chain_sandbox):
    return make_pipeline(mongo, chain_sandbox)


def seed(pipeline, count: int, n_hour: int = 1) -> list[dict]:
    docs = [
        {"_id": ObjectId(), "sku": f"S-{i}", "updatedAt": hour(n_hour, minute=i % 60, ms=i)}
        for i in range(count)
    ]
    pipeline.db["products"].insert_many(docs)
    return docs


def ingest_and_anchor(pipeline, n_hour: int = 1) -> dg.ExecuteInProcessResult:
    result = pipeline.materialize(pk(n_hour))
    pipeline.sandbox.flush()
    pipeline.run_job("verify_products")
    return result


def export(pipeline, folder: Path) -> dict:
    key = proof_keys(pipeline.spec())["proof_bundles"]
    result = dg.materialize(
        [pipeline.defs.resolve_assets_def(key)],
        instance=pipeline.instance,
        run_config={"ops": {key.to_python_identifier(): {"config": {"folder": str(folder)}}}},
    )
    assert result.success
    (materialization,) = result.asset_materializations_for_node(key.to_python_identifier())
    return {k: getattr(v, "value", v) for k, v in materialization.metadata.items()}


def records_match(result: dg.ExecuteInProcessResult):
    (evaluation,) = [
        e for e in result.get_asset_check_evaluations() if e.check_name == "certyo_records_match"
    ]
    return evaluation


def test_bundles_for_newly_anchored_versions_only(pipeline, local_chain, tmp_path, capsys):
    seed(pipeline, 5)
    ingest_and_anchor(pipeline)
    first = export(pipeline, tmp_path)
    folder = tmp_path / pipeline.spec().database / "products"
    assert first["count"] == 5
    assert first["folder"] == str(folder.resolve())
    assert len(list(folder.glob("*.proof.json"))) == 5
    assert run_verify([str(folder)], rpc_url=local_chain.url) == 0
    assert capsys.readouterr().out.count("checked on chain 1337") == 5

    assert export(pipeline, tmp_path)["count"] == 0  # nothing new since

    doc = pipeline.db["products"].find_one({"sku": "S-3"})
    pipeline.db["products"].update_one({"_id": doc["_id"]}, {"$set": {"updatedAt": hour(1, 59)}})
    seed(pipeline, 2, n_hour=2)
    ingest_and_anchor(pipeline, 1)
    ingest_and_anchor(pipeline, 2)
    third = export(pipeline, tmp_path)
    assert third["count"] == 3  # the new version of S-3 and two new documents
    assert len(list(folder.glob("*.proof.json"))) == 8
    assert run_verify([str(folder)]) == 0


def test_the_hour_matches_certyo_and_a_difference_is_an_error(pipeline):
    docs = seed(pipeline, 4)
    passed = records_match(ingest_and_anchor(pipeline))
    assert passed.passed, passed.metadata
    assert passed.partition == pk(1)
    assert passed.metadata["held_as_accepted"].value == 4
    assert passed.metadata["at_certyo"].value == 4

    products = pipeline.db["products"]
    products.update_one(
        {"_id": docs[2]["_id"]}, {"$set": {"certyo_record_hash": "sha256:" + "0" * 64}}
    )
    products.insert_one(
        {
            "_id": "never-sent",
            "updatedAt": hour(1, 40),
            "certyo_status": "pending",
            "certyo_version": version_ms(hour(1, 40)),
            "certyo_record_hash": "sha256:" + "1" * 64,
        }
    )
    failed = records_match(pipeline.materialize(pk(1)))
    assert not failed.passed
    assert failed.severity == dg.AssetCheckSeverity.ERROR
    assert failed.metadata["hash_differs"].value == 1
    assert failed.metadata["missing_at_certyo"].value == 1
    assert failed.metadata["first_differing_ids"].value == sorted(
        [str(docs[2]["_id"]), "never-sent"]
    )


def test_compare_hour_counts_each_kind_of_difference():
    held = {"a": (10, "h-a"), "b": (11, "h-b"), "c": (12, "h-c"), "d": (99, "h-d")}
    certyo = {"a": (10, "h-a"), "b": (11, "other"), "d": (13, "h-d13"), "e": (14, "h-e")}
    result = compare_hour(held, certyo, 10, 20)
    assert (result.ours, result.certyo, result.matched) == (3, 3, 1)
    assert (result.hash_differs, result.missing_at_certyo, result.version_differs) == (1, 1, 1)
    assert result.not_held == 1  # "e": deleted from MongoDB, or never held as accepted
    assert result.differing_ids == ["b", "c", "d"]
    assert not result.passed
    assert compare_hour(held, certyo, 20, 30).passed  # nothing in that hour
    assert not compare_hour(held, certyo, 90, 100).passed  # ours is d@99, Certyo's d@13
    assert compare_hour({}, {}, 0, 10).passed


def test_a_backfill_range_compares_each_hour_and_names_the_failing_ones(pipeline):
    docs = [{"_id": f"d{i}", "sku": i, "updatedAt": hour(i % 3, minute=i)} for i in range(6)]
    pipeline.db["products"].insert_many(docs)
    job = pipeline.defs.resolve_job_def("ingest_products")
    tags = {
        "dagster/asset_partition_range_start": pk(0),
        "dagster/asset_partition_range_end": pk(2),
    }
    assert records_match(job.execute_in_process(instance=pipeline.instance, tags=tags)).passed
    pipeline.db["products"].update_one(
        {"_id": "d1"}, {"$set": {"certyo_record_hash": "sha256:" + "2" * 64}}
    )
    failed = records_match(job.execute_in_process(instance=pipeline.instance, tags=tags))
    assert not failed.passed
    assert failed.metadata["hours_checked"].value == 3
    assert failed.metadata["failing_hours"].value == [pk(1)]
    assert failed.metadata["first_differing_ids"].value == ["d1"]


def test_proof_bundles_follow_anchoring_status_by_an_automation_sensor(mongo, sandbox):
    demo = make_pipeline(mongo, sandbox, demo_mode=True)
    sensor = demo.defs.resolve_sensor_def("products_proof_bundles_automation")
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    key = proof_keys(demo.spec())["proof_bundles"]
    assets_def = demo.defs.resolve_assets_def(key)
    assert assets_def.automation_conditions_by_key[key] is not None
    assert (
        make_pipeline(mongo, sandbox)
        .defs.resolve_sensor_def("products_proof_bundles_automation")
        .default_status
        == dg.DefaultSensorStatus.STOPPED
    )
