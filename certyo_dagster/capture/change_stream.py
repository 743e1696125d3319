"""Change-stream capture: snapshot, then stream, in bounded runs that only ever move the saved
position over changes Certyo acknowledged.

One run (`ChangeStreamCapture.run`):
1. With no saved position (or `resnapshot`), it opens the stream to record a position first,
   then reads every document in `_id` keyset chunks, shipping each chunk as `upsert` records
   and saving its progress after each one, so a crash resumes mid-snapshot.
2. It resumes the stream after the saved token and drains at most `max_events` or
   `max_seconds`, in batches: map → ship in order → write back → save the token. The token
   saved is the last acknowledged event's, or, when the batch drained the stream, the
   post-batch token (which also covers events the server filtered out, and advances on a
   quiet collection: the heartbeat).
3. Lost history (286), a fatal stream error (280), an invalid token (260) or an
   invalidating event (drop, rename, dropDatabase) is a gap: it is recorded in
   `_certyo_gaps`, attested to Certyo by one gap record, and fails the run with the
   collection and the saved position. `resnapshot` recovers and resolves it.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from itertools import islice
from typing import Any

from bson import Timestamp
from pymongo import UpdateOne
from pymongo.errors import OperationFailure, PyMongoError

from certyo_dagster.capture.change_events import (
    INVALIDATED,
    INVALIDATING,
    LOOKUP_MISSING,
    SNAPSHOT,
    STREAM,
    Ack,
    StreamPosition,
    Tally,
    acknowledged_prefix,
    cluster_int,
    event_version,
    gap_id,
    gap_reason,
    is_certyo_only_update,
    map_event,
    map_snapshot_document,
    post_image,
    snapshot_version,
    stream_pipeline,
    token_digest,
)
from certyo_dagster.capture.polling import after_id_filter
from certyo_dagster.fields import CURSORS_COLLECTION, DEAD_LETTERS_COLLECTION, VERIFICATION_FIELDS
from certyo_dagster.prove.hashing import record_hash
from certyo_dagster.sanitize.documents import PoisonDocumentError, iso_utc, sanitize_document
from certyo_dagster.sanitize.records import EncodedRecord, encode_record, record_id_of
from certyo_dagster.settings import CollectionSpec
from certyo_dagster.ship.ordered import ShipStoppedError, ship_in_order
from certyo_dagster.ship.shipping import ShipClient as IngestClient
from certyo_dagster.source.mongo import bulk_update, upsert_with_retry

GAPS_COLLECTION = "_certyo_gaps"
FULL_DOCUMENT_MODES = ("updateLookup", "whenAvailable", "required")
# A run ends at whichever bound it meets first. A collection that changes faster than
# max_events per sensor interval (10,000 per 30 s is ~330 changes/s) needs a larger
# max_events in the run config; see benchmarks/README.md, stream_throughput.
DEFAULT_MAX_EVENTS = 10_000
DEFAULT_MAX_SECONDS = 60.0
DEFAULT_BATCH_SIZE = 1000
# How long one getMore waits for new events before the run counts the stream as drained.
DEFAULT_MAX_AWAIT_MS = 500
# How long the sensor's peek may read past filtered-out changes before it calls a stream quiet.
PEEK_BUDGET_SECONDS = 2.0
CAPTURE_NAME = "change_stream"
GAP_RECORD_PREFIX = "_certyo_gap:"
# Code 9 (FailedToParse) is what a server answers for a token it cannot read at all.
_UNREADABLE_TOKEN = 9
_UNSET_VERIFICATION = {f: "" for f in VERIFICATION_FIELDS}
_HANDLED = frozenset({"pending", "anchored", "rejected", "failed"})


class StreamFailedError(Exception):
    """The run stopped; everything acknowledged before it was written back and saved."""

    def __init__(self, message: str, report: StreamReport):
        super().__init__(message)
        self.report = report


class StreamGapError(StreamFailedError):
    """Changes can no longer be read from the saved position (recorded in `_certyo_gaps`)."""

    def __init__(self, message: str, report: StreamReport, reason: str, gap: dict):
        super().__init__(message, report)
        self.reason = reason
        self.gap = gap


@dataclass
class StreamReport:
    """Counts a person reads in the Dagster UI."""

    events: int = 0
    snapshot_read: int = 0
    shipped: int = 0
    accepted: int = 0
    replayed: int = 0
    recorded_before: int = 0
    dead_lettered: int = 0
    skipped_certyo_only: int = 0
    skipped_already_shipped: int = 0
    lookup_missing: int = 0
    requests: int = 0
    batches: int = 0
    heartbeat: bool = False
    snapshot_complete: bool = False
    resolved_gaps: int = 0
    elapsed_seconds: float = 0.0
    tally: Tally = field(default_factory=Tally)
    position: StreamPosition | None = None

    @property
    def events_per_second(self) -> float:
        n = self.events + self.snapshot_read
        return n / self.elapsed_seconds if self.elapsed_seconds > 0 else 0.0


# -- the saved position --------------------------------------------------------------------


def read_position(database: Any, spec: CollectionSpec) -> StreamPosition | None:
    row = database[CURSORS_COLLECTION].find_one({"_id": spec.stream_cursor_id})
    return StreamPosition.from_document(row)


def save_position(
    database: Any,
    spec: CollectionSpec,
    position: StreamPosition,
    *,
    only_if_token: dict | None = None,
) -> bool:
    """Save the position; with `only_if_token`, only while the saved token is still that one
    (the sensor's heartbeat must never move a position a run is advancing)."""
    update = {
        "$set": {
            **position.to_document(),
            "collection": spec.collection,
            "database": spec.database,
            "capture": CAPTURE_NAME,
            "writer": "certyo_dagster",
            "updatedAt": _now(),
        }
    }
    cursors = database[CURSORS_COLLECTION]
    if only_if_token is not None:
        result = cursors.update_one(
            {"_id": spec.stream_cursor_id, "resumeToken": only_if_token}, update
        )
        return result.matched_count == 1
    upsert_with_retry(cursors, {"_id": spec.stream_cursor_id}, update)
    return True


def open_gaps(database: Any, spec: CollectionSpec) -> list[dict]:
    return list(
        database[GAPS_COLLECTION].find(
            {"database": spec.database, "collection": spec.collection, "resolvedAt": None}
        )
    )


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def cluster_time_now(database: Any) -> Timestamp:
    """The deployment's current cluster time (the `operationTime` of a ping)."""
    reply = database.command("ping")
    ts = reply.get("operationTime") or (reply.get("$clusterTime") or {}).get("clusterTime")
    if isinstance(ts, Timestamp):
        return ts
    return Timestamp(int(time.time()), 0)


def _waited(asked: float, max_await_ms: int) -> bool:
    """Whether an empty getMore took about as long as the server may wait for events."""
    return time.monotonic() - asked >= 0.9 * max_await_ms / 1000


# -- the peek (sensor) ---------------------------------------------------------------------


@dataclass
class Peek:
    """What the sensor found: `start` (no position or snapshot unfinished), `events`,
    `quiet` (`heartbeat` says whether the post-batch token was saved), or `gap`."""

    kind: str
    position: StreamPosition | None
    heartbeat: bool = False
    detail: str = ""


def peek(
    database: Any, spec: CollectionSpec, *, max_await_ms: int = 200, heartbeat: bool = True
) -> Peek:
    """One cheap look past the saved token (one aggregate, at most one getMore)."""
    position = read_position(database, spec)
    if position is None or position.phase == SNAPSHOT:
        return Peek("start", position)
    try:
        with database[spec.collection].watch(
            stream_pipeline(),
            resume_after=position.resume_token,
            max_await_time_ms=max_await_ms,
            batch_size=1,
        ) as stream:
            budget = time.monotonic() + PEEK_BUDGET_SECONDS
            last_empty: Any = None
            while True:
                asked = time.monotonic()
                event = stream.try_next()
                token = stream.resume_token
                if event is not None or _waited(asked, max_await_ms) or asked >= budget:
                    break
                if token == last_empty:
                    break
                last_empty = token
    except OperationFailure as exc:
        if gap_reason(exc.code) or exc.code == _UNREADABLE_TOKEN:
            return Peek("gap", position, detail=f"code {exc.code}: {exc}")
        raise
    if event is not None:
        return Peek("events", position)
    saved = False
    if heartbeat and token is not None and token != position.resume_token:
        previous = position.resume_token
        position.resume_token = dict(token)
        position.last_processed_at = _now()
        saved = save_position(database, spec, position, only_if_token=previous)
    return Peek("quiet", position, heartbeat=saved)


# -- the run -------------------------------------------------------------------------------


class ChangeStreamCapture:
    """One bounded run for one collection. Not thread-safe; one per run."""

    def __init__(
        self,
        *,
        database: Any,
        spec: CollectionSpec,
        client: IngestClient,
        tenant_id: str,
        run_id: str,
        max_events: int = DEFAULT_MAX_EVENTS,
        max_seconds: float = DEFAULT_MAX_SECONDS,
        full_document: str = "updateLookup",
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_await_ms: int = DEFAULT_MAX_AWAIT_MS,
        max_payload_bytes: int = 1_000_000,
        log: Callable[[str], None] | None = None,
    ):
        if full_document not in FULL_DOCUMENT_MODES:
            raise ValueError(f"full_document must be one of {', '.join(FULL_DOCUMENT_MODES)}")
        if max_events < 1 or batch_size < 1:
            raise ValueError("max_events and batch_size must be at least 1")
        self.database = database
        self.collection = database[spec.collection]
        self.spec = spec
        self.client = client
        self.tenant_id = tenant_id
        self.run_id = run_id
        self.max_events = max_events
        self.max_seconds = max_seconds
        self.full_document = full_document
        self.batch_size = min(batch_size, max_events)
        self.max_await_ms = max_await_ms
        self.max_payload_bytes = max_payload_bytes
        self.log = log or (lambda _msg: None)

    def run(self, *, resnapshot: bool = False) -> StreamReport:
        report = StreamReport()
        began = time.monotonic()
        deadline = began + self.max_seconds
        position: StreamPosition | None = None
        # Write-back and the position save of batch k run in this one thread while batch
        # k+1 is read and shipped; they stay in order and at most one is outstanding.
        self._tails = ThreadPoolExecutor(1, thread_name_prefix="certyo-stream-write-back")
        self._tail: Future | None = None
        try:
            position = read_position(self.database, self.spec)
            report.position = position
            if position is None or resnapshot:
                position = self._begin_snapshot()
                report.position = position
            if position.phase == SNAPSHOT:
                done = self._snapshot(position, report, deadline)
                self._wait_tail()
                if not done:
                    return report
                position.phase = STREAM
                position.snapshot_ended = cluster_time_now(self.database)
                save_position(self.database, self.spec, position)
                report.snapshot_complete = True
                report.resolved_gaps = self._resolve_gaps()
            self._stream(position, report, deadline)
            self._wait_tail()
        except ShipStoppedError as exc:
            self._settle_tail()
            raise StreamFailedError(
                self._describe(f"Certyo failed: {exc}", position), report
            ) from exc
        except OperationFailure as exc:
            self._settle_tail()
            reason = gap_reason(exc.code)
            if reason is None and exc.code == _UNREADABLE_TOKEN and position is not None:
                reason = "invalid_resume_token"
            if reason is None:
                raise StreamFailedError(self._mongo_failure(exc, position), report) from exc
            raise self._gap(position, reason, exc.code, str(exc), report) from exc
        except PyMongoError as exc:
            self._settle_tail()
            raise StreamFailedError(self._mongo_failure(exc, position), report) from exc
        finally:
            self._settle_tail()
            self._tails.shutdown(wait=True)
            report.elapsed_seconds = time.monotonic() - began
        return report

    def _then(self, work: Callable[[], None]) -> None:
        """Run `work` after the previous batch's write-back, in the write-back thread."""
        self._wait_tail()
        self._tail = self._tails.submit(work)

    def _wait_tail(self) -> None:
        if self._tail is not None:
            tail, self._tail = self._tail, None
            tail.result()

    def _settle_tail(self) -> None:
        """Wait for the outstanding write-back while already failing; its own error is
        logged, the first failure is the one reported."""
        try:
            self._wait_tail()
        except PyMongoError as exc:
            self.log(f"{self.spec.collection}: write-back failed too: {exc}")

    # -- snapshot --------------------------------------------------------------------------

    def _begin_snapshot(self) -> StreamPosition:
        """Record where the stream stands before reading a single document."""
        with self.collection.watch(stream_pipeline(), max_await_time_ms=1) as stream:
            token = stream.resume_token
        started = cluster_time_now(self.database)
        if token is None:
            raise PyMongoError("the server returned no resume token for a new change stream")
        position = StreamPosition(
            resume_token=dict(token),
            cluster_time=started,
            phase=SNAPSHOT,
            snapshot_version=snapshot_version(started),
            snapshot_started=started,
            last_processed_at=_now(),
        )
        save_position(self.database, self.spec, position)
        self.log(
            f"{self.spec.collection}: snapshot starts at clusterTime {started.time}.{started.inc}"
        )
        return position

    def _snapshot(self, position: StreamPosition, report: StreamReport, deadline: float) -> bool:
        """Ship the documents after the saved `_id`, chunk by chunk; True when complete."""
        version = position.snapshot_version or snapshot_version(position.snapshot_started)
        query = (
            after_id_filter(position.snapshot_after_id) if position.snapshot_has_after_id else {}
        )
        # One cursor in `_id` order for the whole run (a query per chunk would sort the
        # collection again for every chunk); progress is saved after each chunk.
        with self.collection.find(query).sort("_id", 1).batch_size(self.batch_size) as cursor:
            while True:
                if time.monotonic() >= deadline:
                    self.log(f"{self.spec.collection}: snapshot continues in the next run")
                    return False
                docs = list(islice(cursor, self.batch_size))
                if not docs:
                    return True
                self._snapshot_chunk(docs, version, position, report)

    def _snapshot_chunk(
        self, docs: list[dict], version: str, position: StreamPosition, report: StreamReport
    ) -> None:
        read_at = datetime.now(timezone.utc)
        report.snapshot_read += len(docs)
        records: list[EncodedRecord] = []
        shipped_docs: list[dict] = []
        for doc in docs:
            if doc.get("certyo_version") == version and doc.get("certyo_status") in _HANDLED:
                report.skipped_already_shipped += 1  # shipped before a crash
                continue
            try:
                record = map_snapshot_document(
                    doc,
                    self.spec,
                    self.tenant_id,
                    version=version,
                    read_at=read_at,
                    max_payload_bytes=self.max_payload_bytes,
                )
            except PoisonDocumentError as exc:
                self._dead_letter(doc["_id"], version, exc.reason, str(exc), report)
                continue
            records.append(record)
            shipped_docs.append(doc)
            report.tally.add("upsert", None)
        failure: ShipStoppedError | None = None
        try:
            acks = self._ship(records, report)
        except ShipStoppedError as exc:
            failure, acks = exc, exc.acks
        items = [(d["_id"], r, a) for d, r, a in zip(shipped_docs, records, acks, strict=False)]
        save = True
        if failure is not None:
            # Stopped part way: the chunk is resumed after its last acknowledged document.
            save = bool(acks)
            if acks:
                position.snapshot_after_id = shipped_docs[len(acks) - 1]["_id"]
                position.snapshot_has_after_id = True
        else:
            position.snapshot_after_id = docs[-1]["_id"]
            position.snapshot_has_after_id = True
            position.snapshot_documents += len(docs)
            position.last_processed_at = _now()
        saved = replace(position)

        def tail() -> None:
            self._write_back(items, report)
            if save:
                save_position(self.database, self.spec, saved)

        self._then(tail)
        if failure is not None:
            raise failure

    # -- stream ----------------------------------------------------------------------------

    def _stream(self, position: StreamPosition, report: StreamReport, deadline: float) -> None:
        options: dict[str, Any] = {
            "full_document": self.full_document,
            "max_await_time_ms": self.max_await_ms,
            "batch_size": self.batch_size,
            "resume_after": position.resume_token,
        }
        with self.collection.watch(stream_pipeline(), **options) as stream:
            while True:
                events: list[dict] = []
                invalidating: dict | None = None
                drained = False
                last_empty: Any = None
                while (
                    len(events) < self.batch_size and report.events + len(events) < self.max_events
                ):
                    asked = time.monotonic()
                    event = stream.try_next()
                    if event is None:
                        # An empty batch is not the end of the stream unless the server
                        # waited for new events, or found nothing more to scan: a getMore
                        # that scanned only filtered-out changes (our own write-backs)
                        # returns at once, empty, with a later post-batch token.
                        token = stream.resume_token
                        if (
                            _waited(asked, self.max_await_ms)
                            or token == last_empty
                            or time.monotonic() >= deadline
                        ):
                            drained = True
                            break
                        last_empty = token
                        continue
                    if event.get("operationType") in INVALIDATING:
                        invalidating = event
                        break
                    events.append(event)
                end_token = dict(stream.resume_token) if drained and stream.resume_token else None
                report.events += len(events)
                if events or end_token is not None:
                    self._process(events, end_token, position, report)
                if invalidating is not None:
                    self._wait_tail()
                    raise self._gap(
                        position,
                        INVALIDATED,
                        None,
                        f"a {invalidating['operationType']} event closed the stream",
                        report,
                    )
                if drained or report.events >= self.max_events or time.monotonic() >= deadline:
                    return

    def _process(
        self,
        events: list[dict],
        end_token: dict | None,
        position: StreamPosition,
        report: StreamReport,
    ) -> None:
        """Ship one batch, write it back, move the position over the acknowledged prefix."""
        report.batches += 1
        done: list[Ack] = []  # events settled without shipping (filtered, dead letters)
        records: list[EncodedRecord] = []
        record_event: list[int] = []
        overlap = self._snapshot_overlap(events, position)
        for i, event in enumerate(events):
            operation = event.get("operationType")
            ts = event.get("clusterTime")
            if is_certyo_only_update(event):
                report.skipped_certyo_only += 1
                done.append(Ack(i, "skipped"))
                continue
            image = post_image(event) if operation in ("insert", "update", "replace") else None
            version = event_version(event)
            if image is not None and image.get("certyo_version") == version:
                report.skipped_already_shipped += 1  # replayed after its write-back landed
                done.append(Ack(i, "skipped"))
                continue
            if i in overlap:
                report.skipped_already_shipped += 1  # the snapshot shipped this very state
                done.append(Ack(i, "skipped"))
                continue
            if image is not None and image.get(LOOKUP_MISSING):
                report.lookup_missing += 1
            try:
                record = map_event(
                    event, self.spec, self.tenant_id, max_payload_bytes=self.max_payload_bytes
                )
            except PoisonDocumentError as exc:
                self._dead_letter(
                    event["documentKey"]["_id"], version, exc.reason, str(exc), report
                )
                done.append(Ack(i, "rejected"))
                continue
            except ValueError:
                done.append(Ack(i, "skipped"))  # an event type we do not attest (e.g. DDL)
                continue
            report.tally.add(operation or "?", ts)
            records.append(record)
            record_event.append(i)
        failure: ShipStoppedError | None = None
        try:
            acks = self._ship(records, report)
        except ShipStoppedError as exc:
            failure, acks = exc, exc.acks
        items = [
            (events[record_event[a.index]]["documentKey"]["_id"], records[a.index], a)
            for a in acks
            if events[record_event[a.index]].get("operationType") != "delete"
            and not (post_image(events[record_event[a.index]]) or {}).get(LOOKUP_MISSING)
        ]
        letters = [
            (events[record_event[a.index]]["documentKey"]["_id"], records[a.index].version, a)
            for a in acks
            if a.status == "rejected"
        ]
        settled = done + [Ack(record_event[a.index], a.status) for a in acks]
        advance = acknowledged_prefix(
            [e["_id"] for e in events],
            [e.get("clusterTime") for e in events],
            [self._record_id(e) for e in events],
            settled,
            batch_end_token=end_token if failure is None else None,
        )
        if advance.token is not None:
            if not events:
                report.heartbeat = advance.token != position.resume_token
            position.resume_token = dict(advance.token)
            if advance.cluster_time is not None:
                position.cluster_time = advance.cluster_time
            if advance.last_record_id is not None:
                position.last_record_id = advance.last_record_id
            position.last_processed_at = _now()
        saved = replace(position) if advance.token is not None else None

        def tail() -> None:
            self._write_back(items, report)
            for doc_id, version, ack in letters:
                reason = ack.reason or "rejected by Certyo"
                self._dead_letter(doc_id, version, "certyo_validation", reason, report)
            if saved is not None:
                save_position(self.database, self.spec, saved)

        self._then(tail)
        if failure is not None:
            raise failure

    def _record_id(self, event: dict) -> str | None:
        try:
            return record_id_of(event["documentKey"]["_id"])
        except (KeyError, TypeError, PoisonDocumentError):
            return None

    def _snapshot_overlap(self, events: list[dict], position: StreamPosition) -> set[int]:
        """Events from before the snapshot ended whose post-image is exactly the state the
        snapshot shipped: one version seen by both is one record.

        Only events that carry the exact state they produced qualify: inserts, replaces, and
        updates read with real post-images. An update read with updateLookup carries the
        document as it is now, which may be a later version than the one the event made.
        """
        ended, version = position.snapshot_ended, position.snapshot_version
        if ended is None or version is None:
            return set()
        limit = cluster_int(ended)
        exact = (
            ("insert", "replace", "update")
            if self.full_document != "updateLookup"
            else (
                "insert",
                "replace",
            )
        )
        candidates = {
            i: e
            for i, e in enumerate(events)
            if e.get("operationType") in exact
            and isinstance(e.get("clusterTime"), Timestamp)
            and cluster_int(e["clusterTime"]) <= limit
            and isinstance(e.get("fullDocument"), dict)
        }
        if not candidates:
            return set()
        self._wait_tail()  # the previous batch's labels
        ids = [e["documentKey"]["_id"] for e in candidates.values()]
        labels = {
            d["_id"]: d
            for d in self.collection.find(
                {"_id": {"$in": ids}}, {"certyo_version": 1, "certyo_record_hash": 1}
            )
        }
        overlap = set()
        for i, event in candidates.items():
            label = labels.get(event["documentKey"]["_id"])
            if not label or label.get("certyo_version") != version:
                continue
            try:
                state = record_hash(sanitize_document(event["fullDocument"]))
            except PoisonDocumentError:
                continue
            if state == label.get("certyo_record_hash"):
                overlap.add(i)
        return overlap

    # -- shipping and write-back -----------------------------------------------------------

    def _ship(self, records: list[EncodedRecord], report: StreamReport) -> list[Ack]:
        if not records:
            return []
        report.shipped += len(records)
        try:
            acks, requests = ship_in_order(self.client, self.tenant_id, records)
        except ShipStoppedError as exc:
            report.requests += exc.requests
            self._count(exc.acks, report)
            raise
        report.requests += requests
        self._count(acks, report)
        return acks

    def _count(self, acks: list[Ack], report: StreamReport) -> None:
        for a in acks:
            if a.status == "accepted":
                report.accepted += 1
            elif a.status == "replayed":
                report.replayed += 1
            elif a.status == "recorded":
                report.recorded_before += 1

    def _write_back(
        self, items: list[tuple[Any, EncodedRecord, Ack]], report: StreamReport
    ) -> None:
        """The same certyo_* labels as polling, with the change's version string. A label
        never replaces a later change's label (versions sort in stream order)."""
        now = _now()
        updates = []
        for doc_id, record, ack in items:
            if ack.status not in ("accepted", "replayed") or not ack.record_hash:
                continue
            updates.append(
                UpdateOne(
                    {"_id": doc_id, "certyo_version": {"$not": {"$gte": record.version}}},
                    {
                        "$set": {
                            "certyo_status": "pending",
                            "certyo_record_hash": ack.record_hash,
                            "certyo_version": record.version,
                            "certyo_ingested_at": now,
                        },
                        "$unset": _UNSET_VERIFICATION,
                    },
                )
            )
        if updates:
            bulk_update(self.collection, updates, "write-back")

    def _dead_letter(
        self, doc_id: Any, version: str, reason: str, message: str, report: StreamReport
    ) -> None:
        report.dead_lettered += 1
        try:
            record_id = record_id_of(doc_id)
        except PoisonDocumentError:
            record_id = repr(doc_id)
        now = _now()
        upsert_with_retry(
            self.database[DEAD_LETTERS_COLLECTION],
            {"_id": f"{self.spec.database}.{self.spec.collection}:{record_id}:{version}"},
            {
                "$set": {
                    "database": self.spec.database,
                    "collection": self.spec.collection,
                    "documentId": doc_id,
                    "recordId": record_id,
                    "version": version,
                    "timestamp": None,
                    "reason": reason,
                    "message": message[:2000],
                    "stage": CAPTURE_NAME,
                    "runId": self.run_id,
                    "lastSeenAt": now,
                    "resolvedAt": None,
                },
                "$setOnInsert": {"firstSeenAt": now},
                "$inc": {"attempts": 1},
            },
        )

    # -- gaps ------------------------------------------------------------------------------

    def _gap(
        self,
        position: StreamPosition | None,
        reason: str,
        code: int | None,
        message: str,
        report: StreamReport,
    ) -> StreamGapError:
        position = position or StreamPosition()
        gid = gap_id(self.spec, position, reason)
        now = _now()
        row = upsert_with_retry(
            self.database[GAPS_COLLECTION],
            {"_id": gid},
            {
                "$setOnInsert": {
                    "database": self.spec.database,
                    "collection": self.spec.collection,
                    "from": {
                        "resumeToken": position.resume_token,
                        "clusterTime": position.cluster_time,
                        "description": position.describe(),
                    },
                    "detectedAt": now,
                    "reason": reason,
                    "code": code,
                    "message": message[:2000],
                },
                "$set": {"lastDetectedAt": now, "resolvedAt": None, "runId": self.run_id},
                "$inc": {"detections": 1},
            },
        )
        row = row or {}
        if not row.get("certyoRecordHash"):
            self._attest_gap(row)
        text = self._describe(
            f"a gap in the change history ({reason}"
            + (f", code {code}" if code is not None else "")
            + f"): {message[:300]}. Recorded in {GAPS_COLLECTION} as {gid!r}; recover with "
            "a run with resnapshot: true",
            position,
        )
        return StreamGapError(text, report, reason, row)

    def _attest_gap(self, row: dict) -> None:
        """One Certyo record saying that this range was not captured (built from the stored
        gap, so a retry sends the same record)."""
        origin = row.get("from") or {}
        token = origin.get("resumeToken")
        cluster = origin.get("clusterTime")
        document = {
            "_id": f"{GAP_RECORD_PREFIX}{row['_id']}",
            "gap": True,
            "database": self.spec.database,
            "collection": self.spec.collection,
            "from": {
                "resumeTokenSha256": token_digest(token) if token else None,
                "clusterTime": f"{cluster.time}.{cluster.inc}"
                if isinstance(cluster, Timestamp)
                else None,
            },
            "detectedAt": row.get("detectedAt"),
            "reason": row.get("reason"),
        }
        detected = row.get("detectedAt") or _now()
        record = encode_record(
            self.spec,
            self.tenant_id,
            doc_id=document["_id"],
            operation="upsert",
            document=document,
            source_time=detected,
            version=f"gap-{iso_utc(detected)}",
            idempotency_key=f"mongo-gap:{self.spec.database}.{self.spec.collection}:"
            + hashlib.sha256(row["_id"].encode("utf-8")).hexdigest(),
        )
        try:
            acks, _ = ship_in_order(self.client, self.tenant_id, [record])
        except ShipStoppedError as exc:
            self.log(f"the gap record could not be sent to Certyo yet: {exc}")
            return
        if acks and acks[0].record_hash:
            self.database[GAPS_COLLECTION].update_one(
                {"_id": row["_id"]},
                {
                    "$set": {
                        "certyoRecordId": record.record_id,
                        "certyoRecordHash": acks[0].record_hash,
                    }
                },
            )

    def _resolve_gaps(self) -> int:
        result = self.database[GAPS_COLLECTION].update_many(
            {
                "database": self.spec.database,
                "collection": self.spec.collection,
                "resolvedAt": None,
            },
            {"$set": {"resolvedAt": _now(), "resolvedByRun": self.run_id}},
        )
        return result.modified_count

    # -- messages --------------------------------------------------------------------------

    def _describe(self, cause: str, position: StreamPosition | None) -> str:
        where = position.describe() if position else "no saved position"
        return (
            f"change stream of {self.spec.database}.{self.spec.collection} stopped: {cause}. "
            f"Saved position: {where}; nothing after it was marked acknowledged"
        )

    def _mongo_failure(self, exc: PyMongoError, position: StreamPosition | None) -> str:
        return self._describe(f"MongoDB failed: {type(exc).__name__}: {exc}", position)
