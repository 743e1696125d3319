"""The polling position: the sensor's cursor string and its mirror row in `_certyo_cursors`.

The mirror lets a fresh Dagster instance, or the reference poller, pick up where the pipeline
stopped; a row the reference poller wrote becomes a handoff point.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from bson import json_util

from certyo_dagster.capture.polling import VersionKey, utc_naive
from certyo_dagster.fields import CURSORS_COLLECTION
from certyo_dagster.settings import CollectionSpec
from certyo_dagster.source.mongo import upsert_with_retry


def encode_position(key: VersionKey | None) -> str | None:
    """The sensor cursor: `(lastSyncAt, lastId)` as a string Dagster can store."""
    if key is None:
        return None
    return json_util.dumps(
        {"lastSyncAt": utc_naive(key.ts), "lastId": key.doc_id},
        json_options=json_util.CANONICAL_JSON_OPTIONS,
    )


def decode_position(value: str | None) -> VersionKey | None:
    if not value:
        return None
    data = json_util.loads(value, json_options=json_util.CANONICAL_JSON_OPTIONS)
    return VersionKey(utc_naive(data["lastSyncAt"]), data.get("lastId"))


@dataclass
class CursorMirror:
    """The row `{_id: "poll_<c>"}` in `_certyo_cursors`, shared with the reference poller."""

    position: VersionKey | None
    handoff_before: datetime | None


def read_cursor_mirror(database: Any, spec: CollectionSpec) -> CursorMirror:
    """Read the mirror; a row written by the reference poller becomes a handoff point."""
    row = database[CURSORS_COLLECTION].find_one({"_id": spec.cursor_id})
    if not row or not isinstance(row.get("lastSyncAt"), datetime):
        return CursorMirror(None, None)
    last_sync = utc_naive(row["lastSyncAt"])
    handoff = row.get("handoffBefore")
    if row.get("writer") != "certyo_dagster":
        # The reference poller saved only `lastSyncAt`: everything before it was shipped by
        # that poller. Remember that point for good, so its versions are never sent again.
        handoff = last_sync
        database[CURSORS_COLLECTION].update_one(
            {"_id": spec.cursor_id},
            {"$set": {"handoffBefore": handoff, "writer": "certyo_dagster"}},
        )
        return CursorMirror(VersionKey(last_sync, None), handoff)
    position = VersionKey(last_sync, row.get("lastId")) if "lastId" in row else None
    return CursorMirror(position or VersionKey(last_sync, None), handoff)


def write_cursor_mirror(database: Any, spec: CollectionSpec, position: VersionKey) -> None:
    upsert_with_retry(
        database[CURSORS_COLLECTION],
        {"_id": spec.cursor_id},
        {
            "$set": {
                "lastSyncAt": utc_naive(position.ts),
                "lastId": position.doc_id,
                "collection": spec.collection,
                "database": spec.database,
                "writer": "certyo_dagster",
                "updatedAt": datetime.now(timezone.utc).replace(tzinfo=None),
            }
        },
    )
