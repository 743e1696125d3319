"""Debezium capture wiring: asset `<db>/<c>/debezium_events`, job `debezium_<c>` and the
sensor `<c>_debezium_sensor`, for collections with `capture: debezium`.

Verification (`verify_<c>`, `anchoring_status`, `tamper_audit`) is the same as for polling;
it reads the `certyo_*` fields the run writes back.
"""

from datetime import datetime, timedelta, timezone
from typing import Any

import dagster as dg
from pydantic import Field

from certyo_dagster.fields import DEAD_LETTERS_COLLECTION
from certyo_dagster.settings import CollectionSpec, PipelineSettings
from certyo_dagster.ship.debezium import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_MESSAGES,
    DEFAULT_MAX_SECONDS,
    DebeziumIngestError,
    DebeziumIngestor,
    DebeziumReport,
)
from certyo_dagster.ship.resource import CertyoResource
from certyo_dagster.source.kafka import KafkaResource, probe_lag
from certyo_dagster.source.mongo import MongoResource, redact_uri_text
from certyo_dagster.wiring.ingestion import CERTYO_POOL
from certyo_dagster.wiring.jobs import asset_job
from certyo_dagster.wiring.schedules import ACTIVE_RUN_STATUSES
from certyo_dagster.wiring.source import collection_source

RETRY_FAILED_RUN_AFTER = timedelta(minutes=5)


class DebeziumConfig(dg.Config):
    """Run config of `debezium_<c>`."""

    max_messages: int = Field(
        default=DEFAULT_MAX_MESSAGES, ge=1, description="Stop after this many Kafka messages."
    )
    max_seconds: float = Field(
        default=DEFAULT_MAX_SECONDS, gt=0, description="Stop after this many seconds."
    )
    batch_size: int = Field(
        default=DEFAULT_BATCH_SIZE,
        ge=1,
        le=1000,
        description="Messages shipped and committed together.",
    )
    max_payload_bytes: int = Field(
        default=1_000_000,
        ge=1,
        description="A sanitized document larger than this becomes a dead letter.",
    )


def debezium_key(spec: CollectionSpec) -> dg.AssetKey:
    return dg.AssetKey([spec.database, spec.collection, "debezium_events"])


def job_name(spec: CollectionSpec) -> str:
    return f"debezium_{spec.collection}"


def build_debezium_defs(spec: CollectionSpec, settings: PipelineSettings) -> dg.Definitions:
    key = debezium_key(spec)
    source = collection_source(
        spec,
        f"The MongoDB collection {spec.database}.{spec.collection}, captured by "
        "Debezium into Kafka.",
    )

    @dg.asset(
        key=key,
        deps=[source.key],
        group_name=spec.collection,
        kinds={"kafka", "certyo"},
        pool=CERTYO_POOL,
        op_tags={"certyo/collection": spec.collection},
        description="Debezium's change events of the collection, read from Kafka in order, "
        "shipped to Certyo with idempotency keys from each change's source position; offsets "
        "are committed only after Certyo acknowledged every message up to them. Poison "
        "messages go to _certyo_dead_letters with their topic, partition and offset.",
        check_specs=[
            dg.AssetCheckSpec(
                "no_dead_letters",
                asset=key,
                description="No message of this collection sits unresolved in "
                "_certyo_dead_letters.",
            )
        ],
    )
    def debezium_events(
        context: dg.AssetExecutionContext,
        config: DebeziumConfig,
        mongo: MongoResource,
        certyo: CertyoResource,
        kafka: KafkaResource,
    ):
        database = mongo.get_database()
        ingestor = DebeziumIngestor(
            database=database,
            spec=spec,
            kafka=kafka,
            client=certyo.get_client(),
            tenant_id=certyo.tenant_id,
            run_id=context.run.run_id,
            max_messages=config.max_messages,
            max_seconds=config.max_seconds,
            batch_size=config.batch_size,
            max_payload_bytes=config.max_payload_bytes,
            log=context.log.info,
        )
        try:
            report = ingestor.run()
        except DebeziumIngestError as exc:
            raise dg.Failure(
                description=redact_uri_text(str(exc), mongo.uri),
                metadata=_counts(exc.report),
            ) from None
        open_letters = database[DEAD_LETTERS_COLLECTION].count_documents(
            {"database": spec.database, "collection": spec.collection, "resolvedAt": None}
        )
        yield dg.MaterializeResult(metadata=_counts(report))
        yield dg.AssetCheckResult(
            check_name="no_dead_letters",
            passed=open_letters == 0,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={
                "open_dead_letters": open_letters,
                "dead_lettered_this_run": report.dead_lettered,
                "where": f"{DEAD_LETTERS_COLLECTION} in {spec.database}",
            },
        )

    job = asset_job(
        job_name(spec),
        [key],
        description=f"Read Debezium's events of {spec.database}.{spec.collection} from Kafka "
        "and ship them to Certyo in order.",
        tags={"certyo/collection": spec.collection},
        # One step: run it in the run's own process instead of spawning a step process,
        # which costs seconds of every run's latency.
        executor_def=dg.in_process_executor,
    )
    return dg.Definitions(
        assets=[source, debezium_events],
        jobs=[job],
        sensors=[build_debezium_sensor(spec, settings, job)],
    )


def _counts(report: DebeziumReport) -> dict:
    return {
        "topic": report.topic,
        "group_id": report.group_id,
        "messages": report.messages,
        "changes": report.changes,
        "sent": report.sent,
        "accepted": report.accepted,
        "replayed": report.replayed,
        "tombstones_skipped": report.tombstones,
        "own_write_backs_skipped": report.own_write_backs,
        "after_null_updates": report.after_null_updates,
        "dead_lettered": report.dead_lettered,
        "dead_letter_reasons": dg.MetadataValue.json(report.dead_letter_reasons),
        "operations": dg.MetadataValue.json(report.operations),
        "written_back": report.written_back,
        "committed_offsets": dg.MetadataValue.json(
            {str(p): o for p, o in sorted(report.committed.items())}
        ),
        "failed_commits": report.failed_commits,
        "partition_assignments": report.rebalances,
        "read_ahead": report.read_ahead,
        "read_ahead_dropped": report.read_ahead_dropped,
        "caught_up": report.caught_up,
        "messages_per_second": round(report.messages_per_second, 1),
        "elapsed_seconds": round(report.elapsed_seconds, 3),
    }


def _failed_generation(instance: dg.DagsterInstance, name: str) -> int:
    """Failed runs of the job that ended more than RETRY_FAILED_RUN_AFTER ago.

    Part of the run key, so a position whose run failed is requested again, but not before
    the delay (an outage does not become a run storm).
    """
    cutoff = (datetime.now(timezone.utc) - RETRY_FAILED_RUN_AFTER).timestamp()
    records = instance.get_run_records(
        filters=dg.RunsFilter(job_name=name, statuses=[dg.DagsterRunStatus.FAILURE]), limit=100
    )
    return sum(1 for r in records if r.end_time is not None and r.end_time < cutoff)


def build_debezium_sensor(
    spec: CollectionSpec, settings: PipelineSettings, job: Any
) -> dg.SensorDefinition:
    @dg.sensor(
        name=f"{spec.collection}_debezium_sensor",
        job=job,
        minimum_interval_seconds=spec.sensor_interval_seconds,
        default_status=(
            dg.DefaultSensorStatus.RUNNING if settings.demo_mode else dg.DefaultSensorStatus.STOPPED
        ),
        description=f"Every {spec.sensor_interval_seconds}s, compare the consumer group's "
        "committed offsets with the end of each partition (found by reading) and request a "
        f"{job.name} run while the group has lag.",
    )
    def debezium_sensor(context: dg.SensorEvaluationContext, kafka: KafkaResource):
        active = context.instance.get_runs(
            filters=dg.RunsFilter(job_name=job.name, statuses=ACTIVE_RUN_STATUSES), limit=1
        )
        if active:
            return dg.SkipReason(f"a {job.name} run is in progress; it reads the lag")
        lag = probe_lag(kafka, spec)
        if not lag.exists:
            return dg.SkipReason(f"topic {lag.topic} does not exist yet (Debezium creates it)")
        if not lag.has_lag:
            return dg.SkipReason(
                f"group {kafka.group_for(spec)} has read {lag.topic} to the end "
                f"(committed {lag.position() or 'nothing'})"
            )
        position = lag.position()
        return dg.RunRequest(
            run_key=f"{position}:{_failed_generation(context.instance, job.name)}",
            tags={
                "certyo/trigger": "sensor",
                "certyo/committed_offsets": position[:200],
                "certyo/behind_at_least": str(sum(lag.behind.values())),
            },
        )

    return debezium_sensor
