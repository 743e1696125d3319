"""`certyo_dagster.CertyoCollection`: one watched collection, declared in a `defs.yaml`.

    dg scaffold defs certyo_dagster.CertyoCollection orders

writes `certyo_dagster/defs/orders/defs.yaml`. Every attribute has the default that
`CollectionSpec` owns, so `collection` alone is a complete declaration. The definitions are the
ones `CERTYO_COLLECTIONS` builds for the same collection: the component only turns YAML into a
`CollectionSpec` and hands it to `build_collection_definitions`.
"""

from __future__ import annotations

import os

import dagster as dg
from pydantic import Field

from certyo_dagster.settings import (
    DEFAULT_CAPTURE,
    DEFAULT_DATABASE,
    DEFAULT_LOOKBACK_MINUTES,
    DEFAULT_OPEN_HOUR_INTERVAL_MINUTES,
    DEFAULT_PARTITION_START,
    DEFAULT_SCHEDULE_MINUTE,
    DEFAULT_SENSOR_INTERVAL_SECONDS,
    DEFAULT_TAMPER_AUDIT_CRON,
    DEFAULT_TIMESTAMP_FIELD,
    DEFAULT_VERIFY_CONCURRENCY,
    DEFAULT_VERIFY_CRON,
    DEFAULT_VERIFY_DEADLINE_HOURS,
    DEFAULT_VERIFY_MAX_DOCUMENTS,
    MIN_SENSOR_INTERVAL_SECONDS,
    Capture,
    CollectionSpec,
    PipelineSettings,
    demo_mode_from_env,
    parse_partition_start,
)
from certyo_dagster.wiring import build_collection_definitions


class CertyoCollectionScaffolder(dg.Scaffolder):
    """`dg scaffold defs certyo_dagster.CertyoCollection <name>`: a `defs.yaml` for the
    collection `<name>` with the attributes most often changed."""

    def scaffold(self, request: dg.ScaffoldRequest) -> None:
        dg.scaffold_component(
            request,
            {
                "database": DEFAULT_DATABASE,
                "collection": request.target_path.name,
                "timestamp_field": DEFAULT_TIMESTAMP_FIELD,
                "capture": DEFAULT_CAPTURE,
                "partition_start": DEFAULT_PARTITION_START.strftime("%Y-%m-%dT%H:%M"),
            },
        )


@dg.scaffold_with(CertyoCollectionScaffolder)
class CertyoCollection(dg.Component, dg.Resolvable, dg.Model):
    """A MongoDB collection whose every document version is shipped to Certyo and verified.

    Builds, for collection `<c>` of database `<db>`: the assets `<db>/<c>` (external),
    `<db>/<c>/changed_documents`, `certyo_records`, `ingestion_receipts`, `anchoring_status`
    and `tamper_audit`; the jobs `ingest_<c>`, `verify_<c>` and `tamper_audit_<c>`; the
    schedules `ingest_<c>_hourly`, `verify_<c>_schedule` and `tamper_audit_<c>_schedule`; the
    sensor `<c>_change_sensor`. They use the resources `mongo` and `certyo`, which the code
    location `certyo_dagster.definitions` configures from MONGO_URI and CERTYO_* variables.
    """

    collection: str = Field(description="The MongoDB collection; part of every asset key.")
    database: str = Field(default=DEFAULT_DATABASE, description="Database of the collection.")
    timestamp_field: str = Field(
        default=DEFAULT_TIMESTAMP_FIELD,
        description="Field stamped on every write (a dotted path is allowed); each value is "
        "one document version.",
    )
    capture: Capture = Field(
        default=DEFAULT_CAPTURE,
        description="How changes are found. `polling`: keyset reads on (timestamp, _id).",
    )
    partition_start: str = Field(
        default=DEFAULT_PARTITION_START.strftime("%Y-%m-%dT%H:%M"),
        description="First hourly partition, an ISO 8601 UTC hour. Keep it fixed: versions "
        "before it are out of scope.",
    )
    lookback_minutes: int = Field(
        default=DEFAULT_LOOKBACK_MINUTES,
        ge=0,
        description="How far behind its cursor the sensor re-reads (late-committed writes).",
    )
    schedule_minute: int = Field(
        default=DEFAULT_SCHEDULE_MINUTE,
        ge=0,
        le=59,
        description="Minute of the hour at which `ingest_<c>_hourly` ingests the hour before.",
    )
    sensor_interval_seconds: int = Field(
        default=DEFAULT_SENSOR_INTERVAL_SECONDS,
        ge=MIN_SENSOR_INTERVAL_SECONDS,
        description="Seconds between ticks of `<c>_change_sensor`.",
    )
    open_hour_interval_minutes: int = Field(
        default=DEFAULT_OPEN_HOUR_INTERVAL_MINUTES,
        ge=0,
        description="The sensor requests the hour in progress at most once per this many "
        "minutes (the first change of a quiet spell at once); closed hours at every tick.",
    )
    verify_cron: str = Field(
        default=DEFAULT_VERIFY_CRON, description="Cadence of `verify_<c>_schedule` (UTC)."
    )
    verify_max_documents: int = Field(
        default=DEFAULT_VERIFY_MAX_DOCUMENTS,
        ge=1,
        description="Pending documents one `verify_<c>` run covers at most.",
    )
    verify_max_in_flight: int = Field(
        default=DEFAULT_VERIFY_CONCURRENCY, ge=1, description="Verify calls in flight."
    )
    verify_deadline_hours: int = Field(
        default=DEFAULT_VERIFY_DEADLINE_HOURS,
        ge=1,
        description="A version still not anchored this long after ingestion becomes failed.",
    )
    tamper_audit_cron: str = Field(
        default=DEFAULT_TAMPER_AUDIT_CRON,
        description="Cadence of `tamper_audit_<c>_schedule` (UTC).",
    )

    def spec(self) -> CollectionSpec:
        """The collection as the wiring sees it; raises ConfigError for unusable values."""
        return CollectionSpec(
            database=self.database,
            collection=self.collection,
            timestamp_field=self.timestamp_field,
            capture=self.capture,
            partition_start=parse_partition_start(
                self.partition_start, f"partition_start of collection {self.collection!r}"
            ),
            lookback_minutes=self.lookback_minutes,
            schedule_minute=self.schedule_minute,
            sensor_interval_seconds=self.sensor_interval_seconds,
            open_hour_interval_minutes=self.open_hour_interval_minutes,
            verify_cron=self.verify_cron,
            verify_max_documents=self.verify_max_documents,
            verify_max_in_flight=self.verify_max_in_flight,
            verify_deadline_hours=self.verify_deadline_hours,
            tamper_audit_cron=self.tamper_audit_cron,
        )

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        spec = self.spec()
        settings = PipelineSettings(collections=[spec], demo_mode=demo_mode_from_env(os.environ))
        return build_collection_definitions(spec, settings)
