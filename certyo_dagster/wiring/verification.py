"""Verification and tamper-audit assets, jobs, schedules and checks for one collection.

`<db>/<c>/anchoring_status` (job `verify_<c>`, every 2 minutes by default) moves pending
document versions to anchored or failed and reports where the collection stands.
`<db>/<c>/tamper_audit` (job `tamper_audit_<c>`, daily) re-hashes every anchored document.
"""

from datetime import datetime, timedelta, timezone
from typing import Any

import dagster as dg
from pydantic import Field
from pymongo.errors import PyMongoError

from certyo_dagster.capture.change_stream import peek
from certyo_dagster.capture.polling import ensure_indexes
from certyo_dagster.fields import PENDING, STATUS
from certyo_dagster.sanitize.documents import iso_utc
from certyo_dagster.settings import (
    DEFAULT_VERIFY_CONCURRENCY,
    DEFAULT_VERIFY_DEADLINE_HOURS,
    DEFAULT_VERIFY_MAX_DOCUMENTS,
    CollectionSpec,
    ConfigError,
    PipelineSettings,
)
from certyo_dagster.ship.resource import CertyoResource
from certyo_dagster.source.mongo import (
    MongoResource,
    describe_mongo_error,
    describe_mongo_errors,
    redact_uri_text,
)
from certyo_dagster.verify.audit import TamperReport, run_tamper_audit
from certyo_dagster.verify.pending import (
    DEFAULT_MAX_ERRORS,
    DEFAULT_PAGE_SIZE,
    INTEGRITY_REASONS,
    AnchoringSummary,
    PendingVerifier,
    VerifyAbortedError,
    VerifyReport,
    anchoring_summary,
    ensure_verify_indexes,
    latency_percentiles,
    oldest_pending_age,
)
from certyo_dagster.wiring.debezium import debezium_key
from certyo_dagster.wiring.ingestion import CERTYO_POOL, asset_keys
from certyo_dagster.wiring.jobs import asset_job
from certyo_dagster.wiring.schedules import ACTIVE_RUN_STATUSES, default_status


class VerifyConfig(dg.Config):
    """Run config of `verify_<c>`; the job's defaults come from CERTYO_VERIFY_* settings."""

    max_documents: int = Field(
        default=DEFAULT_VERIFY_MAX_DOCUMENTS,
        ge=1,
        description="Pending documents verified at most in one run.",
    )
    max_in_flight: int = Field(
        default=DEFAULT_VERIFY_CONCURRENCY,
        ge=1,
        le=64,
        description="Verify calls to Certyo in flight at once.",
    )
    deadline_hours: float = Field(
        default=float(DEFAULT_VERIFY_DEADLINE_HOURS),
        gt=0,
        description="A version not anchored on chain this long after ingestion becomes failed.",
    )
    page_size: int = Field(
        default=DEFAULT_PAGE_SIZE, ge=1, le=1000, description="Pending documents read per query."
    )
    max_errors: int = Field(
        default=DEFAULT_MAX_ERRORS,
        ge=1,
        description="Stop the run after this many verify calls failed (Certyo unavailable).",
    )
    create_indexes: bool = Field(
        default=True, description="Create the certyo_status indexes the selection uses."
    )


class TamperAuditConfig(dg.Config):
    """Run config of `tamper_audit_<c>`."""

    batch_size: int = Field(default=1000, ge=1, le=10_000, description="Documents per read.")
    max_listed_ids: int = Field(
        default=100, ge=0, le=10_000, description="Mismatching recordIds listed in metadata."
    )


def verification_keys(spec: CollectionSpec) -> dict[str, dg.AssetKey]:
    base = [spec.database, spec.collection]
    return {
        "anchoring_status": dg.AssetKey([*base, "anchoring_status"]),
        "tamper_audit": dg.AssetKey([*base, "tamper_audit"]),
    }


def build_verification_defs(spec: CollectionSpec, settings: PipelineSettings) -> dg.Definitions:
    keys = verification_keys(spec)
    receipts = (
        debezium_key(spec) if spec.capture == "debezium" else asset_keys(spec)["ingestion_receipts"]
    )
    group = spec.collection

    @dg.asset(
        key=keys["anchoring_status"],
        deps=[receipts],
        group_name=group,
        kinds={"certyo", "mongodb"},
        pool=CERTYO_POOL,
        op_tags={"certyo/collection": spec.collection},
        description="Pending versions verified against Certyo, Merkle proofs checked here, "
        "and certyo_status written back: anchored (with tx hash, root, block, CID), failed "
        "(with certyo_failure_reason) or still pending. Metadata: counts per status, the "
        "oldest pending version, latency from ingestion to anchoring.",
        check_specs=[
            dg.AssetCheckSpec(
                "no_failed_documents",
                asset=keys["anchoring_status"],
                description="No document is in certyo_status: failed. ERROR when a proof, "
                "hash or payload did not hold; WARN when anchoring merely did not happen "
                "(deadline, unknown_to_certyo).",
            ),
            dg.AssetCheckSpec(
                "oldest_pending_within_deadline",
                asset=keys["anchoring_status"],
                description="The oldest pending version was ingested less than the deadline ago.",
            ),
        ],
    )
    def anchoring_status(
        context: dg.AssetExecutionContext,
        config: VerifyConfig,
        mongo: MongoResource,
        certyo: CertyoResource,
    ):
        deadline = timedelta(hours=config.deadline_hours)
        collection = mongo.get_collection(spec.collection)
        failure: str | None = None
        try:
            if config.create_indexes:
                for warning in ensure_indexes(collection, spec) + ensure_verify_indexes(collection):
                    context.log.warning(warning)
            verifier = PendingVerifier(
                collection=collection,
                spec=spec,
                client=certyo.get_client(),
                max_documents=config.max_documents,
                max_in_flight=config.max_in_flight,
                page_size=config.page_size,
                deadline=deadline,
                max_errors=config.max_errors,
                log=context.log.info,
            )
            try:
                report = verifier.run()
            except VerifyAbortedError as exc:
                report = exc.report
                failure = redact_uri_text(str(exc), mongo.uri)
            now = datetime.now(timezone.utc)
            summary = anchoring_summary(collection)
        except ConfigError as exc:
            raise dg.Failure(description=str(exc)) from None
        except PyMongoError as exc:
            raise dg.Failure(description=describe_mongo_error(exc, mongo.uri)) from None

        yield dg.MaterializeResult(metadata=status_metadata(summary, report, now, deadline))
        yield failed_documents_check(summary)
        yield oldest_pending_check(summary, now, deadline)
        if failure is None and report.errors:
            failure = (
                f"{report.errors} verify calls failed (first: {report.error_samples[0]}); "
                "those documents stay pending and are retried by the next run"
            )
        if failure is not None:
            raise dg.Failure(description=failure, metadata=run_counts(report))

    @dg.asset(
        key=keys["tamper_audit"],
        deps=[keys["anchoring_status"]],
        group_name=group,
        kinds={"mongodb"},
        op_tags={"certyo/collection": spec.collection},
        description="Every anchored document re-hashed from its current payload and compared "
        "with certyo_record_hash; a mismatch means it was changed without updating "
        f"`{spec.timestamp_field}` or edited directly in the database.",
        check_specs=[
            dg.AssetCheckSpec(
                "no_tampered_documents",
                asset=keys["tamper_audit"],
                description="Every anchored document still hashes to its anchored record hash.",
            )
        ],
    )
    def tamper_audit(
        context: dg.AssetExecutionContext, config: TamperAuditConfig, mongo: MongoResource
    ):
        try:
            report = run_tamper_audit(
                mongo.get_collection(spec.collection),
                spec,
                batch_size=config.batch_size,
                max_listed=config.max_listed_ids,
                log=context.log.info,
                stream_settled=(
                    (lambda: peek(mongo.get_database(), spec, heartbeat=False).kind == "quiet")
                    if spec.is_change_stream
                    else None
                ),
            )
        except PyMongoError as exc:
            raise dg.Failure(description=describe_mongo_error(exc, mongo.uri)) from None
        if report.mismatches:
            context.log.error(
                f"{report.mismatches} anchored documents of {spec.database}.{spec.collection} "
                "no longer match their anchored hash"
            )
        yield dg.MaterializeResult(metadata=audit_metadata(report))
        yield tamper_check(report)

    verify_job = asset_job(
        f"verify_{spec.collection}",
        [keys["anchoring_status"]],
        description=f"Verify pending versions of {spec.database}.{spec.collection} with Certyo "
        "and write certyo_status back.",
        tags={"certyo/collection": spec.collection},
        config={
            "ops": {
                keys["anchoring_status"].to_python_identifier(): {
                    "config": {
                        "max_documents": spec.verify_max_documents,
                        "max_in_flight": spec.verify_max_in_flight,
                        "deadline_hours": float(spec.verify_deadline_hours),
                    }
                }
            }
        },
    )
    audit_job = asset_job(
        f"tamper_audit_{spec.collection}",
        [keys["tamper_audit"]],
        description=f"Re-hash every anchored document of {spec.database}.{spec.collection}.",
        tags={"certyo/collection": spec.collection},
    )
    return dg.Definitions(
        assets=[anchoring_status, tamper_audit],
        jobs=[verify_job, audit_job],
        schedules=[
            build_verify_schedule(spec, settings, verify_job),
            dg.ScheduleDefinition(
                name=f"tamper_audit_{spec.collection}_schedule",
                cron_schedule=spec.tamper_audit_cron,
                execution_timezone="UTC",
                job=audit_job,
                default_status=default_status(settings),
                description=f"Daily ({spec.tamper_audit_cron} UTC): re-hash every anchored "
                "document and compare it with the anchored hash.",
            ),
        ],
    )


def build_verify_schedule(
    spec: CollectionSpec, settings: PipelineSettings, job: Any
) -> dg.ScheduleDefinition:
    job_name = f"verify_{spec.collection}"

    @dg.schedule(
        name=f"verify_{spec.collection}_schedule",
        cron_schedule=spec.verify_cron,
        execution_timezone="UTC",
        job=job,
        default_status=default_status(settings),
        description=f"On `{spec.verify_cron}` (UTC), verify pending versions, unless none "
        "is pending or the previous verify run is still going.",
    )
    @describe_mongo_errors
    def verify_schedule(context: dg.ScheduleEvaluationContext, mongo: MongoResource):
        running = context.instance.get_run_records(
            dg.RunsFilter(job_name=job_name, statuses=ACTIVE_RUN_STATUSES), limit=1
        )
        if running:
            return dg.SkipReason(f"{job_name} run {running[0].dagster_run.run_id} is in progress")
        collection = mongo.get_collection(spec.collection)
        if collection.find_one({STATUS: PENDING}, {"_id": 1}) is None:
            return dg.SkipReason(f"no pending documents in {spec.database}.{spec.collection}")
        when = context.scheduled_execution_time
        stamp = when.isoformat() if when else datetime.now(timezone.utc).isoformat()
        return dg.RunRequest(run_key=f"verify:{stamp}", tags={"certyo/trigger": "schedule"})

    return verify_schedule


# -- metadata and checks (pure) ----------------------------------------------------------------


def status_table(
    summary: AnchoringSummary, report: VerifyReport, now: datetime, deadline: timedelta
) -> str:
    """The Markdown report: documents per certyo_status, then the anchoring indicators."""
    import pandas as pd  # here, not at the top: every code server and run worker loads this module

    counts = pd.DataFrame(
        [{"certyo_status": status, "documents": n} for status, n in summary.by_status.items()]
    )
    total = max(summary.total, 1)
    counts["share"] = (counts["documents"] / total).map(lambda share: f"{share:.1%}")
    age = oldest_pending_age(summary, now)
    latency = latency_percentiles(report.latencies)
    indicators = pd.DataFrame(
        [
            {"measure": "documents in the collection", "value": str(summary.total)},
            {"measure": "oldest pending (age)", "value": _duration(age)},
            {"measure": "anchoring deadline", "value": _duration(deadline)},
            {
                "measure": "ingestion → anchoring p50 (this run)",
                "value": _duration(_seconds(latency["p50"])),
            },
            {
                "measure": "ingestion → anchoring p95 (this run)",
                "value": _duration(_seconds(latency["p95"])),
            },
            {"measure": "anchored by this run", "value": str(report.anchored)},
            {"measure": "failed by this run", "value": str(report.failed)},
        ]
    )
    parts = [counts.to_markdown(index=False), "", indicators.to_markdown(index=False)]
    if summary.failure_reasons:
        reasons = pd.DataFrame(
            [
                {"failure reason": code, "documents": n}
                for code, n in summary.failure_reasons.most_common()
            ]
        )
        parts += ["", reasons.to_markdown(index=False)]
    return "\n".join(parts)


def status_metadata(
    summary: AnchoringSummary, report: VerifyReport, now: datetime, deadline: timedelta
) -> dict:
    age = oldest_pending_age(summary, now)
    latency = latency_percentiles(report.latencies)
    metadata: dict = {
        "report": dg.MetadataValue.md(status_table(summary, report, now, deadline)),
        "documents": summary.total,
        **{f"status_{_slug(s)}": n for s, n in summary.by_status.items()},
        "oldest_pending_age_seconds": round(age.total_seconds(), 1) if age else None,
        "latency_p50_seconds": _round(latency["p50"]),
        "latency_p95_seconds": _round(latency["p95"]),
        "verified_at": iso_utc(now),
        **run_counts(report),
    }
    if summary.failure_reasons:
        metadata["failure_reasons"] = dg.MetadataValue.json(dict(summary.failure_reasons))
    return metadata


def run_counts(report: VerifyReport) -> dict:
    return {
        "run_selected": report.selected,
        "run_anchored": report.anchored,
        "run_failed": report.failed,
        "run_still_pending": report.still_pending,
        "run_edited_since_ingestion": report.stale,
        "run_lost_races": report.lost_races,
        "run_verify_errors": report.errors,
        "run_certyo_requests": report.requests,
        "run_reached_max_documents": report.reached_max_documents,
        "run_elapsed_seconds": round(report.elapsed_seconds, 3),
    }


def failed_documents_check(summary: AnchoringSummary) -> dg.AssetCheckResult:
    # ERROR when something did not hold up (a proof, a hash, the payload): that is evidence
    # against the data. WARN when a version simply was not anchored: it needs a re-run, and a
    # permanently red check for routine backlog would teach people to ignore red.
    integrity = summary.integrity_failures
    return dg.AssetCheckResult(
        check_name="no_failed_documents",
        passed=summary.failed == 0,
        severity=dg.AssetCheckSeverity.ERROR if integrity else dg.AssetCheckSeverity.WARN,
        metadata={
            "failed_documents": summary.failed,
            "integrity_failures": integrity,
            "failure_reasons": dg.MetadataValue.json(dict(summary.failure_reasons)),
            "failed_record_ids_sample": dg.MetadataValue.json(summary.failed_sample_ids),
            "integrity_reasons": ", ".join(sorted(INTEGRITY_REASONS)),
        },
    )


def oldest_pending_check(
    summary: AnchoringSummary, now: datetime, deadline: timedelta
) -> dg.AssetCheckResult:
    age = oldest_pending_age(summary, now)
    return dg.AssetCheckResult(
        check_name="oldest_pending_within_deadline",
        passed=age is None or age < deadline,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "pending_documents": summary.by_status.get(PENDING, 0),
            "oldest_pending_age_seconds": round(age.total_seconds(), 1) if age else 0.0,
            "deadline_seconds": deadline.total_seconds(),
            "oldest_pending_ingested_at": (
                iso_utc(summary.oldest_pending_ingested_at)
                if summary.oldest_pending_ingested_at
                else ""
            ),
        },
    )


def audit_metadata(report: TamperReport) -> dict:
    return {
        "audited_documents": report.audited,
        "mismatches": report.mismatches,
        "tampered": report.tampered,
        "unhashable": report.unhashable,
        "awaiting_reingestion": report.awaiting_reingestion,
        "mismatched_record_ids": dg.MetadataValue.json(report.tampered_ids),
        "mismatched_ids_truncated": report.mismatches > len(report.tampered_ids),
        "elapsed_seconds": round(report.elapsed_seconds, 3),
    }


def tamper_check(report: TamperReport) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        check_name="no_tampered_documents",
        passed=report.mismatches == 0,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={
            "mismatches": report.mismatches,
            "mismatched_record_ids": dg.MetadataValue.json(report.tampered_ids),
            "audited_documents": report.audited,
        },
    )


def _slug(status: str) -> str:
    return status.replace(" ", "_")


def _seconds(value: float | None) -> timedelta | None:
    return None if value is None else timedelta(seconds=value)


def _round(value: float | None) -> float | None:
    return round(value, 3) if value is not None else None


def _duration(span: timedelta | None) -> str:
    if span is None:
        return "–"
    seconds = span.total_seconds()
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
