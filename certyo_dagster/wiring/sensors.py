"""The change sensor: request an ingestion run for each hour that holds unhandled versions."""

from datetime import datetime, timedelta, timezone
from typing import Any

import dagster as dg
from bson import json_util

from certyo_dagster.capture.cursors import (
    decode_position,
    encode_position,
    read_cursor_mirror,
    write_cursor_mirror,
)
from certyo_dagster.capture.polling import partition_key_for, scan_changes
from certyo_dagster.sanitize.documents import version_ms
from certyo_dagster.settings import CollectionSpec, PipelineSettings
from certyo_dagster.ship.ingest import is_acknowledged
from certyo_dagster.source.mongo import MongoResource, describe_mongo_errors
from certyo_dagster.wiring.partitions import hourly_partitions
from certyo_dagster.wiring.schedules import ACTIVE_RUN_STATUSES

MAX_DOCUMENTS_PER_TICK = 20_000


RETRY_FAILED_HOUR_AFTER = timedelta(minutes=5)
_RANGE_START = "dagster/asset_partition_range_start"
_RANGE_END = "dagster/asset_partition_range_end"


def partitions_with_active_runs(
    instance: dg.DagsterInstance, job_name: str, partitions: dg.PartitionsDefinition
) -> set[str]:
    """Hours with a queued or running run of the job, single hours and backfill ranges alike:
    that run ships what a tick finds (or fails and is retried); requesting another would only
    pile up overlapping runs."""
    busy: set[str] = set()
    runs = instance.get_runs(
        filters=dg.RunsFilter(job_name=job_name, statuses=ACTIVE_RUN_STATUSES), limit=1000
    )
    for run in runs:
        if "dagster/partition" in run.tags:
            busy.add(run.tags["dagster/partition"])
        elif _RANGE_START in run.tags and _RANGE_END in run.tags:
            key_range = dg.PartitionKeyRange(run.tags[_RANGE_START], run.tags[_RANGE_END])
            busy.update(partitions.get_partition_keys_in_range(key_range))
    return busy


def retry_generation(instance: dg.DagsterInstance, job_name: str, partition_key: str) -> int:
    """How many runs for the hour failed more than RETRY_FAILED_HOUR_AFTER ago.

    It is part of the run key: Dagster never launches a run key twice, so without it an hour
    whose run failed for good (after the run retries in dagster.yaml) would not be requested
    again until its next change. The delay keeps an outage from becoming a run storm.
    """
    cutoff = (datetime.now(timezone.utc) - RETRY_FAILED_HOUR_AFTER).timestamp()
    records = instance.get_run_records(
        filters=dg.RunsFilter(
            job_name=job_name,
            statuses=[dg.DagsterRunStatus.FAILURE],
            tags={"dagster/partition": partition_key},
        ),
        limit=100,
    )
    return sum(1 for r in records if r.end_time is not None and r.end_time < cutoff)


def open_hour_on_hold(
    instance: dg.DagsterInstance, job_name: str, spec: CollectionSpec, now: datetime
) -> set[str]:
    """The hour in progress, while its newest run is younger than the open-hour interval.

    Every change in the open hour is a new version, so without a pause a busy collection would
    get a run per tick for it. Holding it back loses nothing: the sensor's position never moves
    past an unacknowledged version, so a later tick (or the closed hour) requests it. The first
    change after a quiet spell is requested at once.
    """
    interval = timedelta(minutes=spec.open_hour_interval_minutes)
    if not interval:
        return set()
    open_hour = partition_key_for(now)
    records = instance.get_run_records(
        filters=dg.RunsFilter(job_name=job_name, tags={"dagster/partition": open_hour}),
        limit=1,
    )
    if (
        records
        and now.timestamp() - records[0].create_timestamp.timestamp() < interval.total_seconds()
    ):
        return {open_hour}
    return set()


def build_change_sensor(
    spec: CollectionSpec,
    settings: PipelineSettings,
    job: Any,
    max_documents_per_tick: int = MAX_DOCUMENTS_PER_TICK,
) -> dg.SensorDefinition:
    lookback = timedelta(minutes=spec.lookback_minutes)
    partitions = hourly_partitions(spec)

    @dg.sensor(
        name=f"{spec.collection}_change_sensor",
        job=job,
        minimum_interval_seconds=spec.sensor_interval_seconds,
        default_status=(
            dg.DefaultSensorStatus.RUNNING if settings.demo_mode else dg.DefaultSensorStatus.STOPPED
        ),
        description=f"Every {spec.sensor_interval_seconds}s, find versions of "
        f"{spec.database}.{spec.collection} not yet acknowledged by Certyo (re-reading "
        f"{spec.lookback_minutes} min of lookback) and request one run per affected hour. "
        f"The hour in progress is requested at most every {spec.open_hour_interval_minutes} min. "
        "The cursor is (lastSyncAt, lastId), mirrored in _certyo_cursors.",
    )
    @describe_mongo_errors
    def change_sensor(context: dg.SensorEvaluationContext, mongo: MongoResource):
        database = mongo.get_database()
        mirror = read_cursor_mirror(database, spec)
        position = decode_position(context.cursor) or mirror.position
        now = datetime.now(timezone.utc)
        # The newest partition is the hour in progress; nothing later can be requested.
        latest = now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)

        def handled(doc: dict, ts: Any) -> bool:
            # A non-date timestamp can never be shipped; it is counted by an asset check.
            if not isinstance(ts, datetime):
                return True
            return is_acknowledged(doc, version_ms(ts), ts, mirror.handoff_before)

        scan = scan_changes(
            database[spec.collection],
            spec,
            position,
            lookback=lookback,
            earliest=spec.partition_start,
            latest=latest,
            max_documents=max_documents_per_tick,
            is_handled=handled,
        )
        cursor = encode_position(scan.position)
        if scan.position is not None:
            write_cursor_mirror(database, spec, scan.position)
        busy = partitions_with_active_runs(context.instance, job.name, partitions)
        held = open_hour_on_hold(context.instance, job.name, spec, now) - busy
        busy |= held
        deferred = sorted(pk for pk in scan.partitions if pk in busy)
        run_requests = [
            dg.RunRequest(
                # The newest unhandled version names the run: a tick that finds the same
                # versions requests nothing new; a newer change requests a new run.
                run_key=f"{pk}:{json_util.dumps(newest.ts)}:{json_util.dumps(newest.doc_id)}"
                f":{retry_generation(context.instance, job.name, pk)}",
                partition_key=pk,
                tags={"certyo/trigger": "sensor", "certyo/unhandled_versions": str(count)},
            )
            for pk, (count, newest) in sorted(scan.partitions.items())
            if pk not in busy
        ]
        if not run_requests:
            since = scan.position.ts.isoformat() if scan.position else "the partition start"
            reason = (
                _deferred_reason(deferred, held, spec.open_hour_interval_minutes)
                if deferred
                else f"no unacknowledged versions since {since} UTC "
                f"({scan.scanned} versions re-read in the lookback)"
            )
            return dg.SensorResult(skip_reason=dg.SkipReason(reason), cursor=cursor)
        context.log.info(
            f"{sum(c for c, _ in scan.partitions.values())} unacknowledged versions in "
            f"{len(run_requests)} hour(s); scanned {scan.scanned}"
            + (" (tick limit reached, continuing next tick)" if scan.truncated else "")
        )
        return dg.SensorResult(run_requests=run_requests, cursor=cursor)

    return change_sensor


def _deferred_reason(deferred: list[str], held: set[str], interval_minutes: int) -> str:
    running = [pk for pk in deferred if pk not in held]
    parts = []
    if running:
        parts.append(f"hours with a run in progress: {', '.join(running)}")
    if held & set(deferred):
        parts.append(
            f"the hour in progress, {', '.join(sorted(held))}, requested at most every "
            f"{interval_minutes} min"
        )
    return f"unacknowledged versions only in {'; and in '.join(parts)}; a later tick requests them"
