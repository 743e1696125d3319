"""Asset jobs resolved against their own assets are the jobs Dagster builds from the whole graph.

`OwnAssetsJob` exists so that a location of many collections loads without resolving every
job against every asset; what Dagster shows and runs must not change.
"""

from __future__ import annotations

from dataclasses import replace

import dagster as dg
import pytest
from dagster._core.definitions.unresolved_asset_job_definition import (
    UnresolvedAssetJobDefinition,
)
from dagster._core.remote_representation.external_data import RepositorySnap
from dagster._serdes import serialize_value

from certyo_dagster.settings import PipelineSettings, parse_collections
from certyo_dagster.wiring import build_definitions
from certyo_dagster.wiring.jobs import OwnAssetsJob, asset_job


@pytest.fixture
def settings(monkeypatch) -> PipelineSettings:
    monkeypatch.setenv("CERTYO_KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9")
    polling, stream, debezium, other = parse_collections("a,b,c,d", "shop")
    return PipelineSettings(
        collections=[
            polling,
            replace(stream, capture="change_stream"),
            replace(debezium, capture="debezium"),
            other,
        ]
    )


def job_summary(repo: dg.RepositoryDefinition) -> dict:
    summary = {}
    for job in repo.get_all_jobs():
        graph = job.asset_layer.asset_graph
        summary[job.name] = {
            "snapshot_id": job.get_job_snapshot_id(),
            "executable": sorted(k.to_user_string() for k in graph.executable_asset_keys),
            "checks": sorted(str(k) for k in graph.asset_check_keys),
            "resources": sorted(job.resource_defs),
            "partitioned": job.partitions_def is not None,
        }
    return summary


def test_the_location_snapshot_and_every_job_are_what_dagster_resolves_itself(
    settings, monkeypatch
):
    ours = build_definitions(settings).get_repository_def()
    our_snapshot = serialize_value(RepositorySnap.from_def(ours))
    our_jobs = job_summary(ours)
    # Dagster's own resolution, against the whole location's graph.
    monkeypatch.setattr(OwnAssetsJob, "resolve", UnresolvedAssetJobDefinition.resolve)
    theirs = build_definitions(settings).get_repository_def()

    assert our_snapshot == serialize_value(RepositorySnap.from_def(theirs))
    assert our_jobs == job_summary(theirs)
    assert {"ingest_a", "stream_b", "debezium_c", "verify_d", "tamper_audit_d"} <= set(our_jobs)


def test_each_job_is_resolved_from_its_own_collection_only(settings):
    repo = build_definitions(settings).get_repository_def()
    for name in ("ingest_a", "verify_a", "stream_b", "debezium_c", "tamper_audit_d"):
        collection = name.rsplit("_", 1)[1]
        graph = repo.get_job(name).asset_layer.asset_graph
        assert {key.path[1] for key in graph.get_all_asset_keys()} == {collection}, name
        assert {key.path[1] for key in graph.source_asset_graph.get_all_asset_keys()} == {
            collection
        }, name


def test_an_asset_job_runs_and_a_missing_key_is_reported_as_dagster_reports_it():
    @dg.asset
    def report() -> None:
        pass

    @dg.asset(deps=[report])
    def summary() -> None:
        pass

    job = asset_job("summary_job", [summary.key])
    defs = dg.Definitions(assets=[report, summary], jobs=[job])
    result = defs.resolve_job_def("summary_job").execute_in_process()
    assert result.success
    assert [e.asset_key for e in result.get_asset_materialization_events()] == [summary.key]

    missing = asset_job("missing_job", [dg.AssetKey("nowhere")])
    with pytest.raises(dg.DagsterInvalidDefinitionError, match="missing_job"):
        dg.Definitions(assets=[report], jobs=[missing]).resolve_job_def("missing_job")
