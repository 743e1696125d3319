"""Extraction: read document versions out of MongoDB in `(timestamp, _id)` order.

A version is a document at a given value of its timestamp field. Everything here reads in
keyset order on `(ts, _id)`, backed by a compound index, so page boundaries that fall inside a
run of equal timestamps neither drop nor repeat documents (pitfall 3), and nothing is limited
to a fixed count and then skipped (pitfall 1).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import pymongo
from bson import Binary, Decimal128, Int64, ObjectId
from pymongo.errors import AutoReconnect, CursorNotFound

from certyo_dagster.fields import STATUS, VERSION
from certyo_dagster.settings import CollectionSpec
from certyo_dagster.source.mongo import ensure_index

# How many times a window scan resumes from its last key after a transient failure.
SCAN_RESUMES = 3

# MongoDB compares values of different BSON types by a fixed type order, and `$gt` only
# matches values of the same type ("type bracketing"). To continue after an `_id` of one type
# we must also match every `_id` of a type that sorts later: each later type is matched by a
# lower bound of its own, which an index can serve. Arrays,
# regexes and undefined cannot be an `_id`; Timestamp and MaxKey ids, which no driver
# generates, are not paged past.
_LATER_ID_TYPES: list[tuple[tuple[type, ...], dict]] = [
    ((int, float, Int64, Decimal128), {"$gte": float("-inf")}),
    ((str,), {"$gte": ""}),
    ((dict,), {"$gte": {}}),
    ((bytes, Binary, uuid.UUID), {"$gte": Binary(b"")}),
    ((ObjectId,), {"$gte": ObjectId("0" * 24)}),
    ((bool,), {"$type": "bool"}),  # a type, not values: no number can ever match
    ((datetime,), {"$type": "date"}),
]


def utc_naive(ts: datetime) -> datetime:
    """The naive-UTC form pymongo stores and returns."""
    if ts.tzinfo is not None:
        ts = ts.astimezone(timezone.utc).replace(tzinfo=None)
    return ts


def utc_aware(ts: datetime) -> datetime:
    return ts.replace(tzinfo=timezone.utc) if ts.tzinfo is None else ts.astimezone(timezone.utc)


def _type_rank(value: Any) -> int:
    """Position of the value's BSON type in `_LATER_ID_TYPES` (-1 for null)."""
    if value is None:
        return -1
    if isinstance(value, bool):  # an int subclass in Python, its own type in BSON
        return 5
    for position, (types, _) in enumerate(_LATER_ID_TYPES):
        if isinstance(value, types):
            return position
    return len(_LATER_ID_TYPES)


def after_id_filter(last_id: Any) -> dict:
    """Documents whose `_id` sorts strictly after `last_id`, whatever their BSON types."""
    later = [{"_id": clause} for _, clause in _LATER_ID_TYPES[_type_rank(last_id) + 1 :]]
    return {"$or": [{"_id": {"$gt": last_id}}, *later]}


def after_key_filter(ts_field: str, ts: datetime, last_id: Any) -> dict:
    """Documents strictly after `(ts, last_id)` in `(ts, _id)` order."""
    return {"$or": [{ts_field: {"$gt": ts}}, {"$and": [{ts_field: ts}, after_id_filter(last_id)]}]}


@dataclass(frozen=True)
class VersionKey:
    """A position in `(timestamp, _id)` order. `doc_id` None means before every id at `ts`."""

    ts: datetime
    doc_id: Any = None


def window_filter(
    spec: CollectionSpec, start: datetime, end: datetime, after: VersionKey | None = None
) -> dict:
    """The half-open window `[start, end)` on the timestamp field, after an optional key."""
    ts = spec.timestamp_field
    clauses: list[dict] = [{ts: {"$gte": utc_naive(start), "$lt": utc_naive(end)}}]
    if after is not None:
        if after.doc_id is None:
            clauses.append({ts: {"$gte": utc_naive(after.ts)}})
        else:
            clauses.append(after_key_filter(ts, utc_naive(after.ts), after.doc_id))
    return clauses[0] if len(clauses) == 1 else {"$and": clauses}


def sort_keys(spec: CollectionSpec) -> list[tuple[str, int]]:
    return [(spec.timestamp_field, pymongo.ASCENDING), ("_id", pymongo.ASCENDING)]


def ensure_indexes(collection: Any, spec: CollectionSpec) -> list[str]:
    """The `(ts, _id)` index keyset reads rely on; warnings for what could not be made."""
    warning = ensure_index(collection, sort_keys(spec), f"certyo_{spec.timestamp_field}_id")
    return [warning] if warning else []


def iter_window_batches(
    collection: Any,
    spec: CollectionSpec,
    start: datetime,
    end: datetime,
    *,
    batch_size: int = 1000,
    projection: dict | None = None,
    after: VersionKey | None = None,
) -> Iterator[list[dict]]:
    """Yield the window's documents in `(ts, _id)` order, `batch_size` at a time.

    One server cursor streams the window (no skip, no limit, never the whole window in
    memory). If the cursor dies on a transient error it is reopened after the last key
    already yielded, so a scan survives a primary step-down without repeating or dropping.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    position = after
    resumes = 0
    while True:
        cursor = collection.find(
            window_filter(spec, start, end, position), projection, sort=sort_keys(spec)
        ).batch_size(batch_size)
        batch: list[dict] = []
        try:
            for doc in cursor:
                batch.append(doc)
                if len(batch) >= batch_size:
                    position = _last_key(batch, spec, position)
                    yield batch
                    batch = []
            if batch:
                yield batch
            return
        except (AutoReconnect, CursorNotFound):
            resumes += 1
            if resumes > SCAN_RESUMES:
                raise
            if batch:
                # Hand over what was read before the failure, then resume after it.
                position = _last_key(batch, spec, position)
                yield batch
        finally:
            close = getattr(cursor, "close", None)
            if close is not None:
                close()


def _last_key(batch: list[dict], spec: CollectionSpec, fallback: VersionKey | None) -> Any:
    """Key of the batch's last document with a date timestamp. A range query also matches
    an array holding a date in the window; such a document cannot be a keyset position."""
    for doc in reversed(batch):
        ts = timestamp_of(doc, spec)
        if isinstance(ts, datetime):
            return VersionKey(ts, doc["_id"])
    return fallback


def timestamp_of(doc: dict, spec: CollectionSpec) -> Any:
    """The raw value at the (possibly dotted) timestamp field, or None."""
    value: Any = doc
    for part in spec.timestamp_field.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def count_untimestamped(collection: Any, spec: CollectionSpec) -> int:
    """Documents whose timestamp is missing, null, a string or a number: no window can ever
    contain them. Each clause is a single-type bracket an index on the field can serve."""
    ts = spec.timestamp_field
    types = ("string", "double", "int", "long", "decimal")
    return collection.count_documents({"$or": [{ts: None}, *({ts: {"$type": t}} for t in types)]})


# -- change detection -----------------------------------------------------------------------

HOUR_FORMAT = "%Y-%m-%d-%H:%M"


def partition_key_for(ts: datetime) -> str:
    """The hourly partition (UTC) that holds `ts`, in Dagster's hourly key format."""
    return utc_aware(ts).replace(minute=0, second=0, microsecond=0).strftime(HOUR_FORMAT)


@dataclass
class ChangeScan:
    """What one sensor tick found."""

    # partition key → (unhandled versions, the largest unhandled key in it)
    partitions: dict[str, tuple[int, VersionKey]]
    position: VersionKey | None
    scanned: int
    truncated: bool


def scan_changes(
    collection: Any,
    spec: CollectionSpec,
    position: VersionKey | None,
    *,
    lookback: timedelta,
    earliest: datetime,
    latest: datetime,
    max_documents: int,
    is_handled: Callable[[dict, Any], bool],
) -> ChangeScan:
    """Find unhandled versions from `position - lookback` on, in `(ts, _id)` order.

    The returned position is the last key before the first unhandled version: it never
    passes a version that Certyo has not acknowledged. Re-reading the lookback window each
    tick catches writes that became visible late with an older timestamp (pitfall 2).
    """
    start = utc_naive(earliest)
    if position is not None:
        start = max(start, utc_naive(position.ts) - lookback)
    end = utc_naive(latest)
    partitions: dict[str, tuple[int, VersionKey]] = {}
    new_position = position
    blocked = False
    scanned = 0
    last_handled: VersionKey | None = None
    projection = {spec.timestamp_field: 1, VERSION: 1, STATUS: 1}
    for docs in iter_window_batches(
        collection, spec, start, end, batch_size=min(1000, max_documents), projection=projection
    ):
        for doc in docs:
            scanned += 1
            ts = timestamp_of(doc, spec)
            if not isinstance(ts, datetime):
                # An array holding a date in range: never a position, never a partition;
                # ingestion dead-letters it as bad_timestamp.
                continue
            key = VersionKey(ts, doc["_id"])
            if is_handled(doc, ts):
                last_handled = key
                if not blocked and (new_position is None or _after(key, new_position)):
                    new_position = key
                continue
            if not blocked:
                blocked = True
                # Never beyond the first unhandled version, even if an earlier tick was.
                if new_position is None or not _after(key, new_position):
                    new_position = last_handled or VersionKey(ts, None)
            pk = partition_key_for(ts)
            count, _ = partitions.get(pk, (0, key))
            partitions[pk] = (count + 1, key)
            if scanned >= max_documents:
                break
        if scanned >= max_documents:
            return ChangeScan(partitions, new_position, scanned, True)
    return ChangeScan(partitions, new_position, scanned, False)


def _after(a: VersionKey, b: VersionKey) -> bool:
    """`a` sorts strictly after `b` in `(ts, _id)` order (None id = before every id)."""
    if a.ts != b.ts:
        return a.ts > b.ts
    if b.doc_id is None:
        return a.doc_id is not None
    if a.doc_id is None:
        return False
    ra, rb = _type_rank(a.doc_id), _type_rank(b.doc_id)
    if ra != rb:
        return ra > rb
    try:
        return a.doc_id > b.doc_id
    except TypeError:
        return str(a.doc_id) > str(b.doc_id)
