"""Asset jobs resolved against their own assets, not the whole location's asset graph.

Dagster resolves every `define_asset_job` against the full asset graph of the code location:
each resolution walks every asset definition, so a location of N collections (3 asset jobs
each) spends N jobs × N assets when it loads, and that part alone grew ~7× from 100 to 300
collections. A job only ever contains its selected assets, their checks and the definitions
directly upstream or alongside them (unexecutable), which is what `get_asset_graph_for_job`
keeps of the full graph. `resolve_asset_jobs` hands each job just those definitions, taken
from the full graph built once, with the same resources and executor the location would
give it, so the jobs Dagster shows and runs are the ones it would have built itself.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping

import dagster as dg
from dagster._core.definitions.asset_selection import KeysAssetSelection
from dagster._core.definitions.assets.graph.asset_graph import AssetGraph
from dagster._core.definitions.unresolved_asset_job_definition import (
    UnresolvedAssetJobDefinition,
)
from dagster._core.execution.build_resources import wrap_resources_for_execution


def resolve_asset_jobs(defs: dg.Definitions) -> dg.Definitions:
    """`defs` with each asset job that selects asset keys resolved against its own assets.

    Jobs with any other kind of selection, and locations with their own executor, are left to
    Dagster. Schedules and sensors that target a resolved job are pointed at it.
    """
    if defs.executor is not None:
        return defs
    unresolved = _resolvable_jobs(defs)
    if not unresolved:
        return defs
    resources = wrap_resources_for_execution(defs.resources)
    graph = dg.Definitions(
        assets=defs.assets, asset_checks=defs.asset_checks, resources=resources
    ).resolve_asset_graph()
    checks_by_asset: dict[dg.AssetKey, list[dg.AssetsDefinition]] = defaultdict(list)
    for check_key in graph.asset_check_keys:
        checks_by_asset[check_key.asset_key].append(graph.assets_def_for_key(check_key))

    resolved: dict[str, dg.JobDefinition] = {}
    for name, job in unresolved.items():
        selected = set(job.selection.selected_keys)  # type: ignore[attr-defined]
        if not all(graph.has(key) for key in selected):
            continue  # Dagster reports the missing keys
        own = {graph.assets_def_for_key(key) for key in selected}
        own.update(ad for key in selected for ad in checks_by_asset[key])
        neighbours = {
            key
            for ad in own
            for key in (*ad.node_keys_by_input_name.values(), *ad.node_keys_by_output_name.values())
            if graph.has(key)
        }
        own.update(graph.assets_def_for_key(key) for key in neighbours)
        resolved[name] = job.resolve(
            asset_graph=AssetGraph.from_assets(list(own)), resource_defs=resources
        )
    return dg.Definitions(
        assets=defs.assets,
        asset_checks=defs.asset_checks,
        jobs=[_swap(job, resolved) for job in defs.jobs or []],
        schedules=[_retarget_schedule(s, resolved) for s in defs.schedules or []],
        sensors=[_retarget_sensor(s, resolved) for s in defs.sensors or []],
        resources=defs.resources,
        loggers=defs.loggers,
        metadata=defs.metadata,
        component_tree=defs.component_tree,
    )


def _resolvable_jobs(defs: dg.Definitions) -> dict[str, UnresolvedAssetJobDefinition]:
    """The key-selection asset jobs of `defs`, its schedules and sensors, one per name."""
    candidates: list[object] = list(defs.jobs or [])
    for schedule in defs.schedules or []:
        if isinstance(schedule, dg.ScheduleDefinition) and schedule.target.has_job_def:
            candidates.append(schedule.job)
    for sensor in defs.sensors or []:
        candidates.extend(t.job_def for t in sensor.targets if t.has_job_def)
    jobs: dict[str, UnresolvedAssetJobDefinition] = {}
    conflicting: set[str] = set()
    for job in _unique(candidates):
        if not isinstance(job, UnresolvedAssetJobDefinition):
            conflicting.add(getattr(job, "name", ""))
        elif not isinstance(job.selection, KeysAssetSelection):
            conflicting.add(job.name)
        elif job.name in jobs and jobs[job.name] is not job:
            conflicting.add(job.name)  # Dagster decides whether they are the same job
        else:
            jobs[job.name] = job
    return {name: job for name, job in jobs.items() if name not in conflicting}


def _unique(objects: Iterable[object]) -> list[object]:
    return list({id(o): o for o in objects}.values())


def _swap(job: object, resolved: Mapping[str, dg.JobDefinition]) -> object:
    if isinstance(job, UnresolvedAssetJobDefinition) and job.name in resolved:
        return resolved[job.name]
    return job


def _retarget_schedule(schedule: object, resolved: Mapping[str, dg.JobDefinition]) -> object:
    if (
        isinstance(schedule, dg.ScheduleDefinition)
        and schedule.target.has_job_def
        and isinstance(schedule.job, UnresolvedAssetJobDefinition)
        and schedule.job.name in resolved
    ):
        return schedule.with_updated_job(resolved[schedule.job.name])
    return schedule


def _retarget_sensor(
    sensor: dg.SensorDefinition, resolved: Mapping[str, dg.JobDefinition]
) -> dg.SensorDefinition:
    targets = list(sensor.targets)
    if not targets or not all(t.has_job_def for t in targets):
        return sensor
    if not any(_swap(t.job_def, resolved) is not t.job_def for t in targets):
        return sensor
    with warnings.catch_warnings():
        # Dagster copies the sensor's `owners` through a parameter it marks beta.
        warnings.simplefilter("ignore", dg.BetaWarning)
        return sensor.with_updated_jobs([_swap(t.job_def, resolved) for t in targets])  # type: ignore[list-item]
