"""Asset jobs resolved against their own assets are the jobs Dagster builds from the whole graph.

`resolve_asset_jobs` exists so that a location of many collections loads without resolving
every job against every asset; what Dagster shows and runs must not change.
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
from certyo_dagster.wiring import build_collection_definitions, build_definitions
from certyo_dagster.wiring.jobs import resolve_asset_jobs
from certyo_dagster.wiring.resources import default_resources


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


def dagsters_own(settings: PipelineSettings) -> dg.Definitions:
    """The same definitions with every job left to Dagster's resolution."""
    return dg.Definitions.merge(
        *(build_collection_definitions(spec, settings) for spec in settings.collections),
        dg.Definitions(resources=default_resources(settings)),
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


def test_the_location_snapshot_and_every_job_are_what_dagster_resolves_itself(settings):
    ours = build_definitions(settings).get_repository_def()
    theirs = dagsters_own(settings).get_repository_def()

    assert serialize_value(RepositorySnap.from_def(ours)) == serialize_value(
        RepositorySnap.from_def(theirs)
    )
    assert job_summary(ours) == job_summary(theirs)
    assert {"ingest_a", "stream_b", "debezium_c", "verify_d", "tamper_audit_d"} <= set(
        job_summary(ours)
    )


def test_schedules_and_sensors_launch_the_resolved_jobs(settings):
    defs = build_definitions(settings)
    jobs = {job.name: job for job in defs.jobs}
    assert not any(isinstance(job, UnresolvedAssetJobDefinition) for job in jobs.values())
    for schedule in defs.schedules:
        assert schedule.job is jobs[schedule.job.name], schedule.name
    for sensor in defs.sensors:
        for target in sensor.targets:
            if target.has_job_def:
                assert target.job_def is jobs[target.job_def.name], sensor.name


def test_each_job_holds_only_its_own_collection(settings):
    repo = build_definitions(settings).get_repository_def()
    for name in ("ingest_a", "verify_a", "stream_b", "debezium_c", "tamper_audit_d"):
        collection = name.rsplit("_", 1)[1]
        keys = repo.get_job(name).asset_layer.asset_graph.get_all_asset_keys()
        assert {key.path[1] for key in keys} == {collection}, name


def test_jobs_of_any_other_selection_are_left_to_dagster():
    @dg.asset(group_name="reports")
    def report() -> None:
        pass

    @dg.asset(deps=[report])
    def summary() -> None:
        pass

    by_group = dg.define_asset_job("reports_job", selection=dg.AssetSelection.groups("reports"))
    by_key = dg.define_asset_job("summary_job", selection=dg.AssetSelection.assets(summary))
    schedule = dg.ScheduleDefinition(name="nightly", cron_schedule="0 0 * * *", job=by_key)
    defs = dg.Definitions(assets=[report, summary], jobs=[by_group], schedules=[schedule])

    resolved = resolve_asset_jobs(defs)

    assert resolved.jobs[0] is by_group
    assert not isinstance(resolved.schedules[0].job, UnresolvedAssetJobDefinition)
    ours, theirs = resolved.get_repository_def(), defs.get_repository_def()
    assert serialize_value(RepositorySnap.from_def(ours)) == serialize_value(
        RepositorySnap.from_def(theirs)
    )
    assert job_summary(ours) == job_summary(theirs)
    result = resolved.resolve_job_def("summary_job").execute_in_process()
    assert result.success
    assert [e.asset_key for e in result.get_asset_materialization_events()] == [summary.key]
