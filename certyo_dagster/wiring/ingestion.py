"""Ingestion assets: `<db>/<c>` → changed_documents → certyo_records → ingestion_receipts.

The three assets are materialized by one streaming step. Handing whole partitions from one
asset to the next through an IO manager would hold every document of an hour in memory (a
busy hour is millions of versions), so the step streams extract → sanitize → ingest batch by
batch and reports a materialization with its own counts for each of the three assets. The
lineage in the UI is the same as with three steps; memory stays flat.
"""

from datetime import datetime, timedelta

import dagster as dg
from pydantic import Field
from pymongo.errors import PyMongoError

from certyo_dagster.capture.cursors import read_cursor_mirror
from certyo_dagster.capture.polling import count_untimestamped, ensure_indexes
from certyo_dagster.fields import DEAD_LETTERS_COLLECTION
from certyo_dagster.sanitize.documents import iso_utc
from certyo_dagster.sanitize.records import DEFAULT_MAX_PAYLOAD_BYTES, CertyoRecordEncoder
from certyo_dagster.settings import CollectionSpec, ConfigError, PipelineSettings
from certyo_dagster.ship.errors import CertyoError
from certyo_dagster.ship.ingest import IngestFailedError, IngestReport, WindowIngestor
from certyo_dagster.ship.resource import CertyoResource
from certyo_dagster.ship.shipping import BULK_MAX_RECORDS, DEFAULT_MAX_IN_FLIGHT, Shipper
from certyo_dagster.source.mongo import MongoResource, describe_mongo_error, redact_uri_text
from certyo_dagster.wiring.jobs import asset_job
from certyo_dagster.wiring.partitions import hourly_partitions
from certyo_dagster.wiring.schedules import build_ingest_schedule
from certyo_dagster.wiring.sensors import build_change_sensor
from certyo_dagster.wiring.source import collection_source

CERTYO_POOL = "certyo"


class IngestConfig(dg.Config):
    """Run config of `ingest_<c>` (Launchpad or `dagster job execute -c`)."""

    force: bool = Field(
        default=False,
        description="Send versions already acknowledged again. Certyo answers with "
        "idempotent replays; nothing is stored twice.",
    )
    batch_size: int = Field(
        default=BULK_MAX_RECORDS, ge=1, le=BULK_MAX_RECORDS, description="Documents per batch."
    )
    max_in_flight: int = Field(
        default=DEFAULT_MAX_IN_FLIGHT,
        ge=1,
        le=32,
        description="Bulk requests to Certyo in flight at once.",
    )
    max_payload_bytes: int = Field(
        default=DEFAULT_MAX_PAYLOAD_BYTES,
        ge=1,
        description="A sanitized document larger than this becomes a dead letter.",
    )
    create_indexes: bool = Field(
        default=True, description="Create the (timestamp, _id) and certyo_status indexes."
    )


def asset_keys(spec: CollectionSpec) -> dict[str, dg.AssetKey]:
    base = [spec.database, spec.collection]
    return {
        "source": dg.AssetKey(base),
        "changed_documents": dg.AssetKey([*base, "changed_documents"]),
        "certyo_records": dg.AssetKey([*base, "certyo_records"]),
        "ingestion_receipts": dg.AssetKey([*base, "ingestion_receipts"]),
    }


def build_ingestion_defs(spec: CollectionSpec, settings: PipelineSettings) -> dg.Definitions:
    keys = asset_keys(spec)
    group = spec.collection
    partitions = hourly_partitions(spec)
    source = collection_source(
        spec,
        f"The MongoDB collection {spec.database}.{spec.collection}, versioned by "
        f"`{spec.timestamp_field}`.",
    )
    specs = [
        dg.AssetSpec(
            keys["changed_documents"],
            deps=[keys["source"]],
            description=f"Document versions whose `{spec.timestamp_field}` falls in the hour, "
            "read in (timestamp, _id) order.",
            group_name=group,
            kinds={"mongodb"},
        ),
        dg.AssetSpec(
            keys["certyo_records"],
            deps=[keys["changed_documents"]],
            description="The versions sanitized to I-JSON and mapped to Certyo records, with "
            "version-specific idempotency keys. Poison documents go to _certyo_dead_letters.",
            group_name=group,
            kinds={"python"},
        ),
        dg.AssetSpec(
            keys["ingestion_receipts"],
            deps=[keys["certyo_records"]],
            description="What Certyo accepted; each accepted version is written back as "
            "certyo_status: pending with its record hash.",
            group_name=group,
            kinds={"certyo"},
        ),
    ]
    check_specs = [
        dg.AssetCheckSpec(
            "no_dead_letters",
            asset=keys["ingestion_receipts"],
            description="No version of this hour sits unresolved in _certyo_dead_letters.",
        ),
        dg.AssetCheckSpec(
            "all_documents_timestamped",
            asset=keys["changed_documents"],
            description=f"Every document has a date in `{spec.timestamp_field}`; documents "
            "without one can never fall in a window and are never shipped.",
        ),
    ]

    @dg.multi_asset(
        name=f"ingest_{spec.collection}_window",
        specs=specs,
        check_specs=check_specs,
        partitions_def=partitions,
        pool=CERTYO_POOL,
        can_subset=False,
        backfill_policy=dg.BackfillPolicy.single_run(),
        op_tags={"certyo/collection": spec.collection},
    )
    def ingest_window(
        context: dg.AssetExecutionContext,
        config: IngestConfig,
        mongo: MongoResource,
        certyo: CertyoResource,
    ):
        window = context.partition_time_window
        try:
            database = mongo.get_database()
            collection = database[spec.collection]
            if config.create_indexes:
                for warning in ensure_indexes(collection, spec):
                    context.log.warning(warning)
            mirror = read_cursor_mirror(database, spec)
            ingestor = WindowIngestor(
                database=database,
                encoder=CertyoRecordEncoder(
                    spec, certyo.tenant_id, max_payload_bytes=config.max_payload_bytes
                ),
                shipper=Shipper(
                    certyo.get_client(),
                    certyo.tenant_id,
                    batch_size=config.batch_size,
                    max_in_flight=config.max_in_flight,
                ),
                run_id=context.run.run_id,
                partition_key=_partition_label(context),
                force=config.force,
                handoff_before=mirror.handoff_before,
                log=context.log.info,
            )
            report = ingestor.run(window.start, window.end)
            untimestamped = count_untimestamped(collection, spec)
            open_letters = database[DEAD_LETTERS_COLLECTION].count_documents(
                _dead_letter_filter(spec, window.start, window.end)
            )
        except IngestFailedError as exc:
            raise dg.Failure(
                description=redact_uri_text(str(exc), mongo.uri),
                metadata=_counts(exc.report),
            ) from None
        except CertyoError as exc:
            raise dg.Failure(description=f"Certyo request failed: {exc}") from None
        except ConfigError as exc:
            raise dg.Failure(description=str(exc)) from None
        except PyMongoError as exc:
            raise dg.Failure(description=describe_mongo_error(exc, mongo.uri)) from None

        window_meta = {
            "window_start": iso_utc(window.start),
            "window_end": iso_utc(window.end),
        }
        yield dg.MaterializeResult(
            asset_key=keys["changed_documents"],
            metadata={
                **window_meta,
                "extracted": report.extracted,
                "min_timestamp": iso_utc(report.min_ts) if report.min_ts else "",
                "max_timestamp": iso_utc(report.max_ts) if report.max_ts else "",
                "skipped_already_acknowledged": report.skipped_acknowledged,
                "untimestamped_documents": untimestamped,
            },
        )
        yield dg.MaterializeResult(
            asset_key=keys["certyo_records"],
            metadata={
                **window_meta,
                "sent": report.sent,
                "dead_lettered": report.dead_lettered,
                "dead_letter_reasons": dg.MetadataValue.json(report.dead_letter_reasons),
                "preview": dg.MetadataValue.md(_preview_markdown(report)),
            },
        )
        yield dg.MaterializeResult(
            asset_key=keys["ingestion_receipts"],
            metadata={**window_meta, **_counts(report)},
        )
        yield dg.AssetCheckResult(
            check_name="no_dead_letters",
            asset_key=keys["ingestion_receipts"],
            passed=open_letters == 0,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={
                "open_dead_letters": open_letters,
                "dead_lettered_this_run": report.dead_lettered,
                "where": f"{DEAD_LETTERS_COLLECTION} in {spec.database}",
            },
        )
        yield dg.AssetCheckResult(
            check_name="all_documents_timestamped",
            asset_key=keys["changed_documents"],
            passed=untimestamped == 0,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={"untimestamped_documents": untimestamped},
        )

    job = asset_job(
        f"ingest_{spec.collection}",
        [s.key for s in specs],
        description=f"Ship every unacknowledged version of {spec.database}.{spec.collection} "
        "in the partition's hour to Certyo.",
        tags={"certyo/collection": spec.collection},
    )
    return dg.Definitions(
        assets=[source, ingest_window],
        jobs=[job],
        schedules=[build_ingest_schedule(spec, settings, job)],
        sensors=[build_change_sensor(spec, settings, job)],
    )


def _partition_label(context: dg.AssetExecutionContext) -> str:
    keys = context.partition_keys
    return keys[0] if len(keys) == 1 else f"{keys[0]}...{keys[-1]}"


def _dead_letter_filter(spec: CollectionSpec, start: datetime, end: datetime) -> dict:
    return {
        "database": spec.database,
        "collection": spec.collection,
        "resolvedAt": None,
        "timestamp": {
            "$gte": start.replace(tzinfo=None) - _utcoffset(start),
            "$lt": end.replace(tzinfo=None) - _utcoffset(end),
        },
    }


def _utcoffset(ts: datetime) -> timedelta:
    return ts.utcoffset() or timedelta(0)


def _counts(report: IngestReport) -> dict:
    return {
        "extracted": report.extracted,
        "sent": report.sent,
        "accepted": report.accepted,
        "replayed": report.replayed,
        "skipped_already_acknowledged": report.skipped_acknowledged,
        "dead_lettered": report.dead_lettered,
        "certyo_requests": report.requests,
        "docs_per_second": round(report.docs_per_second, 1),
        "elapsed_seconds": round(report.elapsed_seconds, 3),
    }


def _preview_markdown(report: IngestReport) -> str:
    if not report.preview:
        return "_No records were sent in this run._"
    import pandas as pd  # here, not at the top: every code server and run worker loads this module

    return pd.DataFrame(report.preview).to_markdown(index=False)
