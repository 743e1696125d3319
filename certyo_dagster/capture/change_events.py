"""Change events as Certyo records, and the stream position: pure functions, no I/O.

A change event maps to one record:
- `operationType` insert → insert, update and replace → update, delete → delete; snapshot
  reads are upsert;
- `sourceTimestamp` is the event's `wallTime`, else the seconds of its `clusterTime` (the high
  32 bits of the BSON Timestamp, never the whole 64-bit number);
- `recordVersion` is the 64-bit `clusterTime` as 20 decimal digits, a dash, and the first 16
  hex digits of the SHA-256 of the resume token: unique per event (two events of one
  transaction share a `clusterTime`, never a token), equal on every replay, and ordered like the
  stream in plain string order;
- `idempotencyKey` carries database, collection, recordId and the SHA-256 of the whole resume
  token (never a prefix of it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import bson
from bson import Timestamp

from certyo_dagster.fields import FIELD_PREFIX as CERTYO_FIELD_PREFIX
from certyo_dagster.sanitize.records import (
    EncodedRecord,
    bounded_key,
    encode_record,
    record_id_of,
)
from certyo_dagster.settings import CollectionSpec

OPERATIONS = {"insert": "insert", "update": "update", "replace": "update", "delete": "delete"}
SNAPSHOT_OPERATION = "upsert"
# Events after which the stream is closed: the collection (or database) is gone or renamed.
INVALIDATING = frozenset({"drop", "rename", "dropDatabase", "invalidate"})

# Server error codes that mean changes can no longer be read from the saved position.
HISTORY_LOST = 286  # ChangeStreamHistoryLost: the position aged out of the oplog
FATAL = 280  # ChangeStreamFatalError
INVALID_TOKEN = 260  # InvalidResumeToken
GAP_CODES = {
    HISTORY_LOST: "history_lost",
    FATAL: "fatal_error",
    INVALID_TOKEN: "invalid_resume_token",
}
INVALIDATED = "invalidated"

SNAPSHOT = "snapshot"
STREAM = "stream"
# A post-image that could not be looked up (the document was deleted before the event was
# read): the update is attested with this marker instead of being dropped.
LOOKUP_MISSING = "_postImageUnavailable"


# -- times and positions -------------------------------------------------------------------


def cluster_seconds(ts: Timestamp) -> int:
    """Seconds since the epoch of a BSON Timestamp (its high 32 bits)."""
    return ts.time


def cluster_int(ts: Timestamp) -> int:
    """The whole 64-bit value: seconds × 2^32 + increment. An order, not a time."""
    return (ts.time << 32) | ts.inc


def event_time(event: Mapping[str, Any]) -> datetime:
    """When the change happened, in UTC: `wallTime`, else `clusterTime`'s seconds."""
    wall = event.get("wallTime")
    if isinstance(wall, datetime):
        return wall.replace(tzinfo=timezone.utc) if wall.tzinfo is None else wall
    ts = event.get("clusterTime")
    if not isinstance(ts, Timestamp):
        raise ValueError("the change event has neither wallTime nor clusterTime")
    return datetime.fromtimestamp(cluster_seconds(ts), tz=timezone.utc)


def token_digest(token: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of a whole resume token."""
    data = token.get("_data")
    raw = data.encode("ascii") if isinstance(data, str) else bson.encode(dict(token))
    return hashlib.sha256(raw).hexdigest()


def event_version(event: Mapping[str, Any]) -> str:
    return f"{cluster_int(event['clusterTime']):020d}-{token_digest(event['_id'])[:16]}"


def snapshot_version(started: Timestamp) -> str:
    """One version for every document a snapshot read: the cluster time it started at.

    It sorts before every event of the stream that starts there.
    """
    return f"{cluster_int(started):020d}-snapshot"


def is_snapshot_version(version: Any) -> bool:
    return isinstance(version, str) and version.endswith("-snapshot")


def event_idempotency_key(spec: CollectionSpec, record_id: str, event: Mapping[str, Any]) -> str:
    return bounded_key(
        f"mongo-cs:{spec.database}.{spec.collection}", record_id, token_digest(event["_id"])
    )


def snapshot_idempotency_key(spec: CollectionSpec, record_id: str, version: str) -> str:
    return bounded_key(f"mongo-snap:{spec.database}.{spec.collection}", record_id, version)


# -- the write-back filter -----------------------------------------------------------------


def _is_certyo(path: str) -> bool:
    return path.startswith(CERTYO_FIELD_PREFIX)


def is_certyo_only_update(event: Mapping[str, Any]) -> bool:
    """An update that touched only `certyo_*` fields (our own write-back): never shipped."""
    if event.get("operationType") != "update":
        return False
    description = event.get("updateDescription") or {}
    updated = description.get("updatedFields") or {}
    removed = description.get("removedFields") or []
    truncated = [t.get("field", "") for t in description.get("truncatedArrays") or []]
    paths = [*updated, *removed, *truncated]
    return bool(paths) and all(_is_certyo(p) for p in paths)


def _non_certyo_count(array_expr: Any, key: str | None) -> dict:
    item = f"$$f.{key}" if key else "$$f"
    return {
        "$size": {
            "$filter": {
                "input": {"$ifNull": [array_expr, []]},
                "as": "f",
                "cond": {
                    "$ne": [{"$substrCP": [item, 0, len(CERTYO_FIELD_PREFIX)]}, CERTYO_FIELD_PREFIX]
                },
            }
        }
    }


def stream_pipeline() -> list[dict]:
    """The `$match` that drops certyo_-only updates on the server (same rule as above)."""
    description = "$updateDescription"
    return [
        {
            "$match": {
                "$expr": {
                    "$or": [
                        {"$ne": ["$operationType", "update"]},
                        {
                            "$gt": [
                                _non_certyo_count(
                                    {"$objectToArray": f"{description}.updatedFields"}, "k"
                                ),
                                0,
                            ]
                        },
                        {"$gt": [_non_certyo_count(f"{description}.removedFields", None), 0]},
                        {"$gt": [_non_certyo_count(f"{description}.truncatedArrays", "field"), 0]},
                    ]
                }
            }
        }
    ]


# -- event → record ------------------------------------------------------------------------


def post_image(event: Mapping[str, Any]) -> dict | None:
    """The document a record attests: the post-image, the delete marker (None), or, for an
    update whose post-image is gone, `{_id, _postImageUnavailable: true}`."""
    operation = event["operationType"]
    if operation == "delete":
        return None
    document = event.get("fullDocument")
    if document is None:
        return {"_id": event["documentKey"]["_id"], LOOKUP_MISSING: True}
    return document


def map_event(
    event: Mapping[str, Any],
    spec: CollectionSpec,
    tenant_id: str,
    *,
    max_payload_bytes: int = 1_000_000,
) -> EncodedRecord:
    """The Certyo record of one insert, update, replace or delete event.

    Raises PoisonDocumentError (a dead letter) and ValueError for other operation types.
    """
    operation = OPERATIONS.get(event.get("operationType"))  # type: ignore[arg-type]
    if operation is None:
        raise ValueError(f"no record for a {event.get('operationType')!r} event")
    doc_id = event["documentKey"]["_id"]
    record_id = record_id_of(doc_id)
    return encode_record(
        spec,
        tenant_id,
        doc_id=doc_id,
        operation=operation,
        document=post_image(event),
        source_time=event_time(event),
        version=event_version(event),
        idempotency_key=event_idempotency_key(spec, record_id, event),
        max_payload_bytes=max_payload_bytes,
    )


def map_snapshot_document(
    doc: Mapping[str, Any],
    spec: CollectionSpec,
    tenant_id: str,
    *,
    version: str,
    read_at: datetime,
    max_payload_bytes: int = 1_000_000,
) -> EncodedRecord:
    record_id = record_id_of(doc["_id"])
    return encode_record(
        spec,
        tenant_id,
        doc_id=doc["_id"],
        operation=SNAPSHOT_OPERATION,
        document=doc,
        source_time=read_at,
        version=version,
        idempotency_key=snapshot_idempotency_key(spec, record_id, version),
        max_payload_bytes=max_payload_bytes,
    )


# -- the position and its bookkeeping ------------------------------------------------------


@dataclass
class StreamPosition:
    """The row `{_id: "<c>"}` of `_certyo_cursors` for a change-stream collection.

    `resume_token` only ever covers events Certyo acknowledged (or that were dead-lettered), in
    stream order. While `phase` is snapshot, `snapshot_after_id` is the last `_id` shipped.
    """

    resume_token: dict | None = None
    cluster_time: Timestamp | None = None
    last_record_id: str | None = None
    last_processed_at: datetime | None = None
    phase: str = STREAM
    snapshot_version: str | None = None
    snapshot_started: Timestamp | None = None
    snapshot_ended: Timestamp | None = None
    snapshot_after_id: Any = None
    snapshot_has_after_id: bool = False
    snapshot_documents: int = 0

    def to_document(self) -> dict:
        return {
            "resumeToken": self.resume_token,
            "clusterTime": self.cluster_time,
            "lastRecordId": self.last_record_id,
            "lastProcessedAt": self.last_processed_at,
            "snapshot": {
                "phase": self.phase,
                "version": self.snapshot_version,
                "startedAt": self.snapshot_started,
                "endedAt": self.snapshot_ended,
                "afterId": self.snapshot_after_id,
                "hasAfterId": self.snapshot_has_after_id,
                "documents": self.snapshot_documents,
            },
        }

    @classmethod
    def from_document(cls, row: Mapping[str, Any] | None) -> StreamPosition | None:
        if not row or not isinstance(row.get("resumeToken"), Mapping):
            return None
        snap = row.get("snapshot") or {}
        return cls(
            resume_token=dict(row["resumeToken"]),
            cluster_time=row.get("clusterTime"),
            last_record_id=row.get("lastRecordId"),
            last_processed_at=row.get("lastProcessedAt"),
            phase=snap.get("phase", STREAM),
            snapshot_version=snap.get("version"),
            snapshot_started=snap.get("startedAt"),
            snapshot_ended=snap.get("endedAt"),
            snapshot_after_id=snap.get("afterId"),
            snapshot_has_after_id=bool(snap.get("hasAfterId")),
            snapshot_documents=int(snap.get("documents") or 0),
        )

    def describe(self) -> str:
        """The position as a person reads it in an error message."""
        if self.resume_token is None:
            return "no saved position"
        when = (
            f"clusterTime {self.cluster_time.time}.{self.cluster_time.inc}"
            if isinstance(self.cluster_time, Timestamp)
            else "no event yet"
        )
        digest = token_digest(self.resume_token)[:16]
        snap = f", snapshot after _id {self.snapshot_after_id!r}" if self.phase == SNAPSHOT else ""
        return f"resume token sha256:{digest}… ({when}{snap})"


@dataclass
class Ack:
    """What happened to one shipped record, in stream order."""

    index: int
    status: str  # accepted | replayed | rejected | recorded (key already used: stored before)
    record_hash: str | None = None
    reason: str | None = None


@dataclass
class Advance:
    """Where the position may move after a batch, and which events were acknowledged."""

    acknowledged: int
    token: dict | None
    cluster_time: Timestamp | None
    last_record_id: str | None


def acknowledged_prefix(
    tokens: Sequence[dict],
    cluster_times: Sequence[Timestamp | None],
    record_ids: Sequence[str | None],
    acks: Iterable[Ack],
    *,
    batch_end_token: dict | None,
) -> Advance:
    """How far the position can move: over the longest prefix of the batch that has an ack.

    `tokens[i]` is event i's resume token. When every event is acknowledged, the position
    moves to `batch_end_token` (the post-batch token, which also covers events the server
    filtered out) if given, else to the last event's token. An event without an ack (the
    call that carried it failed) and every event after it stay unacknowledged (pitfalls 1, 2).
    """
    done = {a.index for a in acks}
    n = 0
    while n < len(tokens) and n in done:
        n += 1
    if n == 0:
        if not tokens and batch_end_token is not None:
            return Advance(0, batch_end_token, None, None)
        return Advance(0, None, None, None)
    cluster = next((c for c in reversed(cluster_times[:n]) if c is not None), None)
    record_id = next((r for r in reversed(record_ids[:n]) if r is not None), None)
    token = batch_end_token if n == len(tokens) and batch_end_token is not None else tokens[n - 1]
    return Advance(n, token, cluster, record_id)


def gap_reason(code: int | None) -> str | None:
    return GAP_CODES.get(code) if code is not None else None


def gap_id(spec: CollectionSpec, position: StreamPosition, reason: str) -> str:
    start = token_digest(position.resume_token)[:32] if position.resume_token else "start"
    return f"{spec.database}.{spec.collection}:{start}:{reason}"


@dataclass
class Tally:
    """Counts of one run by operation type, for the change_events asset."""

    by_operation: dict[str, int] = field(default_factory=dict)
    min_cluster: Timestamp | None = None
    max_cluster: Timestamp | None = None

    def add(self, operation: str, ts: Timestamp | None) -> None:
        self.by_operation[operation] = self.by_operation.get(operation, 0) + 1
        if ts is not None:
            if self.min_cluster is None or ts < self.min_cluster:
                self.min_cluster = ts
            if self.max_cluster is None or ts > self.max_cluster:
                self.max_cluster = ts
