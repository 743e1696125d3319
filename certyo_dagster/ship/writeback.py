"""Write-back: the MongoDB updates that record what Certyo acknowledged, and the dead letters.

Pure functions that build `UpdateOne`s; the caller runs them with `source.mongo.bulk_update`
(dead letters with `bulk_upsert`). Every update of a watched document is pinned to the
version it describes (its `_id` and the timestamp value that was shipped), so a newer edit
made meanwhile is never labelled with an older version's hash. The timestamp field itself is
never written: write-back cannot re-trigger ingestion.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from pymongo import UpdateMany, UpdateOne

from certyo_dagster.fields import (
    ANCHORED,
    FAILURE_REASON,
    INGESTED_AT,
    PENDING,
    RECORD_HASH,
    REJECTED,
    STATUS,
    VERIFICATION_FIELDS,
    VERSION,
)
from certyo_dagster.sanitize.documents import PoisonDocumentError
from certyo_dagster.sanitize.records import record_id_of
from certyo_dagster.settings import CollectionSpec

MAX_LETTER_MESSAGE = 2000
MAX_REASON_DETAIL = 300

_UNSET_VERIFICATION = {f: "" for f in VERIFICATION_FIELDS}
# The previous version's hash and proof do not describe a rejected one.
_UNSET_FOR_REJECTED = {
    f: "" for f in (*VERIFICATION_FIELDS, RECORD_HASH, INGESTED_AT) if f != FAILURE_REASON
}


def pending_update(
    spec: CollectionSpec,
    doc_id: Any,
    ts: Any,
    *,
    version: int,
    record_hash: str | None,
    ingested_at: datetime,
) -> UpdateOne:
    """Mark the version Certyo acknowledged as pending verification, with Certyo's hash."""
    return UpdateOne(
        {"_id": doc_id, spec.timestamp_field: ts},
        {
            "$set": {
                STATUS: PENDING,
                RECORD_HASH: record_hash,
                VERSION: version,
                INGESTED_AT: ingested_at,
            },
            "$unset": _UNSET_VERIFICATION,
        },
    )


def unchanged_by_replay(doc: Mapping[str, Any], version: int, record_hash: str | None) -> bool:
    """True when the document already says this version is anchored with this hash: a forced
    replay of it changes nothing, and writing `pending` would throw the proof away."""
    return (
        doc.get(STATUS) == ANCHORED
        and doc.get(VERSION) == version
        and doc.get(RECORD_HASH) == record_hash
    )


def letter_record_id(doc_id: Any) -> str:
    """The recordId a dead letter is filed under (a repr when the `_id` has none)."""
    try:
        return record_id_of(doc_id)
    except PoisonDocumentError:
        return repr(doc_id)


def dead_letter_upsert(
    spec: CollectionSpec,
    doc_id: Any,
    ts: Any,
    *,
    version: int | None,
    reason: str,
    message: str,
    stage: str,
    run_id: str,
    partition_key: str | None,
    now: datetime,
) -> UpdateOne:
    """File (or file again) a version that was never accepted in `_certyo_dead_letters`.

    One letter per document version: a second failure of the same version counts another
    attempt; a new version gets a letter of its own.
    """
    record_id = letter_record_id(doc_id)
    return UpdateOne(
        {"_id": f"{spec.database}.{spec.collection}:{record_id}:{version}"},
        {
            "$set": {
                "database": spec.database,
                "collection": spec.collection,
                "documentId": doc_id,
                "recordId": record_id,
                "version": version,
                "timestamp": ts if isinstance(ts, datetime) else None,
                "reason": reason,
                "message": message[:MAX_LETTER_MESSAGE],
                "stage": stage,
                "runId": run_id,
                "partitionKey": partition_key,
                "lastSeenAt": now,
                "resolvedAt": None,
            },
            "$setOnInsert": {"firstSeenAt": now},
            "$inc": {"attempts": 1},
        },
        upsert=True,
    )


def rejected_update(
    spec: CollectionSpec,
    doc_id: Any,
    ts: Any,
    *,
    version: int | None,
    reason: str,
    message: str,
) -> UpdateOne | None:
    """Mark a dead-lettered version as handled, so the sensor's position can move past it; a
    later edit gives a new version that is tried again. None when the document has no
    version to pin (no date in its timestamp field): then only the letter records it."""
    if version is None or not isinstance(ts, datetime):
        return None
    return UpdateOne(
        {"_id": doc_id, spec.timestamp_field: ts},
        {
            "$set": {
                STATUS: REJECTED,
                VERSION: version,
                FAILURE_REASON: f"{reason}: {message[:MAX_REASON_DETAIL]}",
            },
            "$unset": _UNSET_FOR_REJECTED,
        },
    )


def resolve_letters(
    spec: CollectionSpec, doc_ids: Iterable[Any], *, run_id: str, now: datetime
) -> UpdateMany:
    """Close the open letters of documents a newer version of which Certyo accepted."""
    return UpdateMany(
        {
            "collection": spec.collection,
            "documentId": {"$in": list(doc_ids)},
            "resolvedAt": None,
        },
        {"$set": {"resolvedAt": now, "resolvedByRun": run_id}},
    )
