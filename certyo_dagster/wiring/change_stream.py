"""Change-stream capture in Dagster: job `stream_<c>`, sensor `<c>_change_stream_sensor`, asset
`<db>/<c>/change_events` (with `ingestion_receipts`, so verification works unchanged) and the
ERROR check `change_stream_position_valid`.

A collection captured this way has no polling job, sensor or schedule. Each run is bounded
(`max_events`, `max_seconds`); the sensor requests one whenever the stream holds events past
the saved position, with a run key that names that position, and never while another
`stream_<c>` run is active.
"""

from datetime import datetime, timedelta, timezone
from typing import Any, Literal

import dagster as dg
from bson import Timestamp, json_util
from pydantic import Field
from pymongo.errors import PyMongoError

from certyo_dagster.capture.change_events import StreamPosition, token_digest
from certyo_dagster.capture.change_stream import (
    DEFAULT_MAX_EVENTS,
    DEFAULT_MAX_SECONDS,
    GAPS_COLLECTION,
    ChangeStreamCapture,
    StreamFailedError,
    StreamGapError,
    StreamReport,
    open_gaps,
    peek,
)
from certyo_dagster.fields import DEAD_LETTERS_COLLECTION
from certyo_dagster.sanitize.documents import iso_utc
from certyo_dagster.settings import CollectionSpec, PipelineSettings
from certyo_dagster.ship.errors import CertyoError
from certyo_dagster.ship.resource import CertyoResource
from certyo_dagster.source.mongo import MongoResource
from certyo_dagster.wiring.ingestion import CERTYO_POOL, asset_keys, redact_uri_text
from certyo_dagster.wiring.jobs import asset_job
from certyo_dagster.wiring.schedules import ACTIVE_RUN_STATUSES
from certyo_dagster.wiring.source import collection_source

POSITION_TAG = "certyo/position"
# dagster.yaml limits runs per value of this tag to one.
STREAM_TAG = "certyo/stream"
CHECK_NAME = "change_stream_position_valid"
# A failed run at the same position is requested again after this long (never for a gap:
# that needs a resnapshot run, and retrying would only detect it again).
RETRY_FAILED_AFTER = timedelta(minutes=1)


class StreamConfig(dg.Config):
    """Run config of `stream_<c>`."""

    max_events: int = Field(
        default=DEFAULT_MAX_EVENTS, ge=1, description="Change events drained at most per run."
    )
    max_seconds: float = Field(
        default=DEFAULT_MAX_SECONDS, gt=0, description="Seconds a run drains at most."
    )
    full_document: Literal["updateLookup", "whenAvailable", "required"] = Field(
        default="updateLookup",
        description="updateLookup: updates carry the document as it is when the event is "
        "read. whenAvailable / required: the post-image stored with the change, for "
        "collections with changeStreamPreAndPostImages enabled.",
    )
    resnapshot: bool = Field(
        default=False,
        description="Start over: record a new stream position, snapshot every document, "
        "resolve the open gaps. The recovery after a gap.",
    )


def stream_keys(spec: CollectionSpec) -> dict[str, dg.AssetKey]:
    keys = asset_keys(spec)
    return {
        "source": keys["source"],
        "change_events": dg.AssetKey([spec.database, spec.collection, "change_events"]),
        "ingestion_receipts": keys["ingestion_receipts"],
    }


def position_key(position: StreamPosition | None) -> str:
    """The position a run key names: the saved token's digest, or `start`."""
    if position is None or position.resume_token is None:
        return "start"
    suffix = "" if position.phase == "stream" else f"-snapshot-{position.snapshot_documents}"
    return token_digest(position.resume_token)[:24] + suffix


def encode_cursor(position: StreamPosition | None) -> str | None:
    """The sensor cursor: a mirror of the saved position in `_certyo_cursors`."""
    if position is None:
        return None
    return json_util.dumps(
        {
            "resumeToken": position.resume_token,
            "clusterTime": position.cluster_time,
            "phase": position.phase,
        },
        json_options=json_util.CANONICAL_JSON_OPTIONS,
    )


def build_change_stream_defs(spec: CollectionSpec, settings: PipelineSettings) -> dg.Definitions:
    keys = stream_keys(spec)
    group = spec.collection
    job_name = f"stream_{spec.collection}"
    source = collection_source(
        spec,
        f"The MongoDB collection {spec.database}.{spec.collection}, captured by its change stream.",
    )
    specs = [
        dg.AssetSpec(
            keys["change_events"],
            deps=[keys["source"]],
            description="Change events (and, first, a snapshot) read from the change stream "
            "after the saved position, mapped to Certyo records: insert, update (replace "
            "too), delete; snapshot reads are upsert. certyo_-only updates are filtered out.",
            group_name=group,
            kinds={"mongodb"},
        ),
        dg.AssetSpec(
            keys["ingestion_receipts"],
            deps=[keys["change_events"]],
            description="What Certyo acknowledged, in stream order; each inserted, updated or "
            "replaced document is written back as certyo_status: pending with its record hash "
            "and version.",
            group_name=group,
            kinds={"certyo"},
        ),
    ]
    check_specs = [
        dg.AssetCheckSpec(
            CHECK_NAME,
            asset=keys["change_events"],
            description="The saved position still reads the whole change history: no open "
            f"gap in {GAPS_COLLECTION} (history lost, invalid token, fatal error, drop or "
            "rename). Recover with a run with resnapshot: true.",
        )
    ]

    @dg.multi_asset(
        name=f"stream_{spec.collection}_changes",
        specs=specs,
        check_specs=check_specs,
        pool=CERTYO_POOL,
        can_subset=False,
        op_tags={"certyo/collection": spec.collection},
    )
    def stream_changes(
        context: dg.AssetExecutionContext,
        config: StreamConfig,
        mongo: MongoResource,
        certyo: CertyoResource,
    ):
        others = [
            r
            for r in context.instance.get_run_records(
                dg.RunsFilter(job_name=job_name, statuses=IN_PROGRESS_RUN_STATUSES), limit=5
            )
            if r.dagster_run.run_id != context.run.run_id
        ]
        if others:
            raise dg.Failure(
                description=f"{job_name} run {others[0].dagster_run.run_id} is active; only "
                "one run per collection may move its stream position"
            )
        try:
            database = mongo.get_database()
            capture = ChangeStreamCapture(
                database=database,
                spec=spec,
                client=certyo.get_client(),
                tenant_id=certyo.tenant_id,
                run_id=context.run.run_id,
                max_events=config.max_events,
                max_seconds=config.max_seconds,
                full_document=config.full_document,
                log=context.log.info,
            )
            try:
                report = capture.run(resnapshot=config.resnapshot)
            except StreamGapError as exc:
                yield dg.AssetCheckResult(
                    check_name=CHECK_NAME,
                    asset_key=keys["change_events"],
                    passed=False,
                    severity=dg.AssetCheckSeverity.ERROR,
                    metadata={
                        "reason": exc.reason,
                        "gap": str(exc.gap.get("_id", "")),
                        "saved_position": _position_text(exc.report.position),
                        "recovery": "run stream_<c> with resnapshot: true",
                    },
                )
                raise dg.Failure(
                    description=redact_uri_text(str(exc), mongo.uri),
                    metadata=run_metadata(exc.report),
                ) from None
            except StreamFailedError as exc:
                raise dg.Failure(
                    description=redact_uri_text(str(exc), mongo.uri),
                    metadata=run_metadata(exc.report),
                ) from None
            gaps = open_gaps(database, spec)
            open_letters = database[DEAD_LETTERS_COLLECTION].count_documents(
                {"database": spec.database, "collection": spec.collection, "resolvedAt": None}
            )
        except CertyoError as exc:
            raise dg.Failure(description=f"Certyo request failed: {exc}") from None
        except PyMongoError as exc:
            raise dg.Failure(
                description=f"MongoDB at {mongo.display_uri} failed: "
                f"{type(exc).__name__}: {redact_uri_text(str(exc), mongo.uri)}"
            ) from None
        meta = run_metadata(report)
        yield dg.MaterializeResult(asset_key=keys["change_events"], metadata=meta)
        yield dg.MaterializeResult(
            asset_key=keys["ingestion_receipts"],
            metadata={
                "accepted": report.accepted,
                "replayed": report.replayed,
                "recorded_before": report.recorded_before,
                "dead_lettered": report.dead_lettered,
                "open_dead_letters": open_letters,
                "certyo_requests": report.requests,
            },
        )
        yield dg.AssetCheckResult(
            check_name=CHECK_NAME,
            asset_key=keys["change_events"],
            passed=not gaps,
            severity=dg.AssetCheckSeverity.ERROR,
            metadata={
                "open_gaps": len(gaps),
                "saved_position": _position_text(report.position),
                "gap_reasons": dg.MetadataValue.json(sorted({g.get("reason", "") for g in gaps})),
            },
        )

    job = asset_job(
        job_name,
        [s.key for s in specs],
        description=f"Ship the change events of {spec.database}.{spec.collection} after the "
        "saved position to Certyo (a snapshot first, when there is no position).",
        tags={"certyo/collection": spec.collection, STREAM_TAG: spec.collection},
        # One step: run it in the run's own process instead of spawning a step process,
        # which costs seconds of every run's latency.
        executor_def=dg.in_process_executor,
    )
    return dg.Definitions(
        assets=[source, stream_changes],
        jobs=[job],
        sensors=[build_change_stream_sensor(spec, settings, job)],
    )


def build_change_stream_sensor(
    spec: CollectionSpec, settings: PipelineSettings, job: Any
) -> dg.SensorDefinition:
    job_name = f"stream_{spec.collection}"

    @dg.sensor(
        name=f"{spec.collection}_change_stream_sensor",
        job=job,
        minimum_interval_seconds=spec.sensor_interval_seconds,
        default_status=(
            dg.DefaultSensorStatus.RUNNING if settings.demo_mode else dg.DefaultSensorStatus.STOPPED
        ),
        description=f"Peek past the saved change-stream position of {spec.collection}; "
        "request a run when events wait, save the post-batch token when the collection is "
        "quiet (the heartbeat).",
    )
    def change_stream_sensor(context: dg.SensorEvaluationContext, mongo: MongoResource):
        active = context.instance.get_run_records(
            dg.RunsFilter(job_name=job_name, statuses=ACTIVE_RUN_STATUSES), limit=1
        )
        if active:
            run = active[0].dagster_run
            if run.status in WAITING_RUN_STATUSES:
                return dg.SkipReason(f"{job_name} run {run.run_id} is waiting to start")
            if not _queues_runs(context.instance):
                return dg.SkipReason(f"{job_name} run {run.run_id} is active")
            # With a run queue, the next run waits in it behind the active one (the queue
            # lets one run per collection start) and begins as soon as that one ends,
            # instead of at the first tick after it: a busy collection never waits a whole
            # interval between runs. Its run key names the position the active run has
            # saved so far; a run that starts reads the position saved by then.
        found = peek(mongo.get_database(), spec)
        cursor = encode_cursor(found.position)
        if cursor is not None:
            context.update_cursor(cursor)
        if found.kind == "quiet":
            return dg.SkipReason(
                f"no change events past {_position_text(found.position)}"
                + ("; heartbeat: saved the post-batch token" if found.heartbeat else "")
            )
        where = position_key(found.position)
        run_key = f"{job_name}:{where}"
        last = context.instance.get_run_records(
            dg.RunsFilter(job_name=job_name, tags={POSITION_TAG: where}), limit=1
        )
        if last and last[0].dagster_run.status == dg.DagsterRunStatus.FAILURE:
            if found.kind == "gap":
                return dg.SkipReason(
                    f"the change history of {spec.collection} has a gap ({found.detail}); "
                    f"run {job_name} with resnapshot: true"
                )
            ended = last[0].end_time or 0.0
            if datetime.now(timezone.utc).timestamp() - ended < RETRY_FAILED_AFTER.total_seconds():
                return dg.SkipReason(f"{job_name} failed at {where} moments ago; retrying later")
            run_key += f":after-{last[0].dagster_run.run_id[:8]}"
        return dg.RunRequest(
            run_key=run_key, tags={POSITION_TAG: where, "certyo/trigger": "sensor"}
        )

    return change_stream_sensor


WAITING_RUN_STATUSES = (dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED)
# Runs that may move the position; one waiting in the queue does not (it reads the position
# when it starts), so a run never refuses to start because the next one is queued.
IN_PROGRESS_RUN_STATUSES = [dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED]


def _queues_runs(instance: dg.DagsterInstance) -> bool:
    """Whether the instance has a run queue, which holds a second stream_<c> run until the
    first ends (dagster.yaml's and deploy/dagster.yaml's limits allow one per collection)."""
    return isinstance(instance.run_coordinator, dg.QueuedRunCoordinator)


def _position_text(position: StreamPosition | None) -> str:
    return position.describe() if position else "no saved position"


def _cluster_text(ts: Timestamp | None) -> str:
    if ts is None:
        return ""
    return f"{iso_utc(datetime.fromtimestamp(ts.time, tz=timezone.utc))} (inc {ts.inc})"


def run_metadata(report: StreamReport) -> dict:
    tally = report.tally
    return {
        "events": report.events,
        "snapshot_documents_read": report.snapshot_read,
        "snapshot_complete": report.snapshot_complete,
        "by_operation_type": dg.MetadataValue.json(dict(sorted(tally.by_operation.items()))),
        "cluster_time_min": _cluster_text(tally.min_cluster),
        "cluster_time_max": _cluster_text(tally.max_cluster),
        "saved_position": _position_text(report.position),
        "shipped": report.shipped,
        "accepted": report.accepted,
        "replayed": report.replayed,
        "recorded_before": report.recorded_before,
        "dead_lettered": report.dead_lettered,
        "skipped_certyo_only_updates": report.skipped_certyo_only,
        "skipped_already_shipped": report.skipped_already_shipped,
        "post_image_unavailable": report.lookup_missing,
        "heartbeat_saved": report.heartbeat,
        "resolved_gaps": report.resolved_gaps,
        "certyo_requests": report.requests,
        "events_per_second": round(report.events_per_second, 1),
        "elapsed_seconds": round(report.elapsed_seconds, 3),
    }
