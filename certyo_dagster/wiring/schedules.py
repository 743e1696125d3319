"""Schedules: the hourly ingestion of the hour that just ended."""

from datetime import timedelta
from typing import Any

import dagster as dg

from certyo_dagster.capture.polling import partition_key_for, utc_aware
from certyo_dagster.settings import CollectionSpec, PipelineSettings

# Runs in these states will still do their work; schedules and sensors do not add another.
ACTIVE_RUN_STATUSES = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]


def default_status(settings: PipelineSettings) -> dg.DefaultScheduleStatus:
    return (
        dg.DefaultScheduleStatus.RUNNING if settings.demo_mode else dg.DefaultScheduleStatus.STOPPED
    )


def build_ingest_schedule(
    spec: CollectionSpec, settings: PipelineSettings, job: Any
) -> dg.ScheduleDefinition:
    @dg.schedule(
        name=f"ingest_{spec.collection}_hourly",
        cron_schedule=f"{spec.schedule_minute} * * * *",
        execution_timezone="UTC",
        job=job,
        default_status=default_status(settings),
        description=f"At minute {spec.schedule_minute} of every hour, ingest the previous "
        "hour: a safety net for changes the sensor missed (it only re-reads the lookback).",
    )
    def ingest_hourly(context: dg.ScheduleEvaluationContext):
        previous_hour = utc_aware(context.scheduled_execution_time) - timedelta(hours=1)
        if previous_hour < spec.partition_start:
            return dg.SkipReason(
                f"the previous hour starts before the partition start "
                f"({spec.partition_start:%Y-%m-%d %H:%M} UTC, set by CERTYO_PARTITION_START "
                "or the component's partition_start)"
            )
        key = partition_key_for(previous_hour)
        return dg.RunRequest(
            run_key=f"hourly:{key}",
            partition_key=key,
            tags={"certyo/trigger": "schedule"},
        )

    return ingest_hourly
