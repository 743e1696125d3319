"""Proof bundles and the hourly reconciliation with Certyo, for one collection.

`<db>/<c>/proof_bundles` (downstream of `anchoring_status`, materialized whenever that
updates) writes a bundle for every version newly anchored since its last materialization
into `<folder>/<db>/<c>/`. `certyo_records_match` is a partitioned asset check on
`ingestion_receipts`: one result per hour, comparing the versions we hold as accepted with
Certyo's query API.
"""

import os
import warnings
from datetime import datetime, timedelta
from pathlib import Path

import dagster as dg
from pydantic import Field
from pymongo.errors import PyMongoError

from certyo_dagster.sanitize.documents import iso_utc, version_ms
from certyo_dagster.settings import CollectionSpec, PipelineSettings
from certyo_dagster.ship.errors import CertyoError
from certyo_dagster.ship.resource import CertyoResource
from certyo_dagster.source.mongo import MongoResource
from certyo_dagster.verify.export import BundleExporter
from certyo_dagster.verify.reconcile import (
    DEFAULT_MAX_LISTED,
    HourComparison,
    compare_hour,
    held_versions,
    latest_versions,
)
from certyo_dagster.wiring.ingestion import CERTYO_POOL, asset_keys, redact_uri_text
from certyo_dagster.wiring.partitions import hourly_partitions
from certyo_dagster.wiring.schedules import default_status
from certyo_dagster.wiring.verification import verification_keys

PROOF_FOLDER_ENV = "CERTYO_PROOF_BUNDLE_DIR"
DEFAULT_PROOF_FOLDER = "proof_bundles"
WATERMARK_KEY = "anchored_through"
# Re-read this far behind the last watermark: a verify run still writing when the previous
# export read can leave versions anchored slightly earlier. Existing files are skipped.
WATERMARK_OVERLAP = timedelta(minutes=10)


class ProofBundlesConfig(dg.Config):
    """Run config of `<db>/<c>/proof_bundles`."""

    folder: str = Field(
        default="",
        description=f"Where bundles go (under <db>/<c>/); empty means ${PROOF_FOLDER_ENV}, "
        f"else ./{DEFAULT_PROOF_FOLDER}.",
    )
    max_listed: int = Field(default=20, ge=0, le=1000, description="File names listed in metadata.")


def proof_keys(spec: CollectionSpec) -> dict[str, dg.AssetKey]:
    return {"proof_bundles": dg.AssetKey([spec.database, spec.collection, "proof_bundles"])}


def proof_folder(config: ProofBundlesConfig, spec: CollectionSpec) -> Path:
    root = config.folder or os.environ.get(PROOF_FOLDER_ENV, "").strip() or DEFAULT_PROOF_FOLDER
    return Path(root) / spec.database / spec.collection


def previous_watermark(context: dg.AssetExecutionContext, key: dg.AssetKey) -> datetime | None:
    event = context.instance.get_latest_materialization_event(key)
    materialization = event.asset_materialization if event else None
    value = materialization.metadata.get(WATERMARK_KEY) if materialization else None
    text = getattr(value, "value", value)
    if not isinstance(text, str) or not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def build_proof_defs(spec: CollectionSpec, settings: PipelineSettings) -> dg.Definitions:
    key = proof_keys(spec)["proof_bundles"]
    receipts = asset_keys(spec)["ingestion_receipts"]
    partitions = hourly_partitions(spec)

    @dg.asset(
        key=key,
        deps=[verification_keys(spec)["anchoring_status"]],
        group_name=spec.collection,
        kinds={"certyo", "json"},
        pool=CERTYO_POOL,
        automation_condition=dg.AutomationCondition.eager(),
        op_tags={"certyo/collection": spec.collection},
        description="A proof bundle (docs/proof-bundle.md) for every version anchored since "
        "the last materialization, written to <folder>/<db>/<c>/; check them with "
        "`certyo-proof verify`. Metadata: how many were written, and the folder.",
    )
    def proof_bundles(
        context: dg.AssetExecutionContext,
        config: ProofBundlesConfig,
        mongo: MongoResource,
        certyo: CertyoResource,
    ) -> dg.MaterializeResult:
        folder = proof_folder(config, spec)
        watermark = previous_watermark(context, key)
        since = watermark - WATERMARK_OVERLAP if watermark else None
        exporter = BundleExporter(mongo.get_collection(spec.collection), spec, certyo.get_client())
        try:
            report = exporter.export_anchored_since(
                since,
                folder,
                max_listed=config.max_listed,
                skip_existing=True,
                log=context.log.info,
            )
        except PyMongoError as exc:
            raise dg.Failure(
                description=f"MongoDB at {mongo.display_uri} failed: "
                f"{type(exc).__name__}: {redact_uri_text(str(exc), mongo.uri)}"
            ) from None
        except CertyoError as exc:
            raise dg.Failure(description=f"Certyo failed: {exc}") from None
        for problem in report.problems:
            context.log.warning(f"no bundle: {problem}")
        through = max(filter(None, [watermark and watermark.replace(tzinfo=None),
                                    report.anchored_through]), default=None)  # fmt: skip
        return dg.MaterializeResult(
            metadata={
                "count": report.written,
                "folder": dg.MetadataValue.path(str(folder.resolve())),
                "already_exported": report.already_exported,
                "skipped": report.skipped,
                "skipped_reasons": dg.MetadataValue.json(report.problems),
                "files_sample": dg.MetadataValue.json(report.files),
                "since": iso_utc(since) if since else "",
                WATERMARK_KEY: iso_utc(through) if through else "",
                "elapsed_seconds": round(report.elapsed_seconds, 3),
            }
        )

    def certyo_records_match(
        context: dg.AssetCheckExecutionContext, mongo: MongoResource, certyo: CertyoResource
    ) -> dg.AssetCheckResult:
        try:
            held = held_versions(mongo.get_collection(spec.collection))
            records = certyo.get_client().query_records(
                database=spec.database, collection=spec.collection
            )
            latest = latest_versions(records)
        except PyMongoError as exc:
            raise dg.Failure(
                description=f"MongoDB at {mongo.display_uri} failed: "
                f"{type(exc).__name__}: {redact_uri_text(str(exc), mongo.uri)}"
            ) from None
        except CertyoError as exc:
            raise dg.Failure(description=f"Certyo's query API failed: {exc}") from None
        # A backfill runs many hours in one step, and Dagster records one result per step:
        # then every hour is compared on its own and the result fails if any hour does.
        hours = [
            (key, partitions.time_window_for_partition_key(key)) for key in context.partition_keys
        ]
        results = {
            key: compare_hour(held, latest, version_ms(w.start), version_ms(w.end))
            for key, w in hours
        }
        failing = [key for key, r in results.items() if not r.passed]
        differing = sorted({i for r in results.values() for i in r.differing_ids})
        total = HourComparison(
            **{
                name: sum(getattr(r, name) for r in results.values())
                for name in (
                    "ours", "certyo", "matched", "missing_at_certyo", "version_differs",
                    "hash_differs", "not_held",
                )
            }
        )  # fmt: skip
        metadata = {
            "held_as_accepted": total.ours,
            "at_certyo": total.certyo,
            "matched": total.matched,
            "mismatches": total.mismatches,
            "missing_at_certyo": total.missing_at_certyo,
            "version_differs": total.version_differs,
            "hash_differs": total.hash_differs,
            "not_held_by_us": total.not_held,
            "first_differing_ids": dg.MetadataValue.json(differing[:DEFAULT_MAX_LISTED]),
        }
        if len(hours) > 1:
            metadata["hours_checked"] = len(hours)
            metadata["failing_hours"] = dg.MetadataValue.json(failing)
        return dg.AssetCheckResult(
            passed=not failing, severity=dg.AssetCheckSeverity.ERROR, metadata=metadata
        )

    # Partitioned asset checks are a Dagster preview feature: say so once, here, instead of
    # a PreviewWarning every time the code location loads.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.PreviewWarning)
        records_match = dg.asset_check(
            asset=receipts,
            name="certyo_records_match",
            partitions_def=partitions,
            pool=CERTYO_POOL,
            description="For the hour: the versions held as accepted (pending or anchored) "
            "match Certyo's query API, in number and in record hash. ERROR on a mismatch, "
            "with the first differing recordIds.",
        )(certyo_records_match)

    # Dagster's own default automation sensor starts stopped; this one follows the project's
    # schedules and sensors (running in demo mode).
    automation = dg.AutomationConditionSensorDefinition(
        f"{spec.collection}_proof_bundles_automation",
        target=dg.AssetSelection.assets(key),
        default_status=dg.DefaultSensorStatus(default_status(settings).value),
        minimum_interval_seconds=spec.sensor_interval_seconds,
        description=f"Materializes {key.to_user_string()} after each anchoring_status update.",
    )
    return dg.Definitions(
        assets=[proof_bundles], asset_checks=[records_match], sensors=[automation]
    )
